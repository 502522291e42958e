//! Names compared ignoring case, as the readers Tether stands in front of
//! compare them: JSON keys as Go's `encoding/json` matches them to struct
//! fields (MCP calls and answers), path literals as servers that route
//! ignoring case match them (`path_case: insensitive`). One definition,
//! so that what Tether takes for one name is what they take.

use std::borrow::Cow;

/// Whether `a` and `b` are one name to a reader that ignores case as
/// Unicode simple case folding does.
///
/// Go's `encoding/json` (which Go MCP servers decode calls with) matches a
/// key to a field under Unicode simple case folding: `ſ` (U+017F) is `s`,
/// `K` (U+212A, Kelvin) is `k`, `ẞ` is `ß`. Simple, not full: `ß` is not
/// `ss`, and the Turkish dotless `ı` and dotted `İ` are not `i` (Go's
/// `unicode.SimpleFold` leaves each alone).
pub fn alike(a: &str, b: &str) -> bool {
    // Equal but for ASCII case: alike, whatever else they hold (the other
    // characters' UTF-8 bytes are compared as they are).
    if a.len() == b.len() && a.eq_ignore_ascii_case(b) {
        return true;
    }
    // Among ASCII characters, simple folding is ASCII case.
    if a.is_ascii() && b.is_ascii() {
        return false;
    }
    a.chars().map(fold).eq(b.chars().map(fold))
}

/// `key` with every character folded: equal for names [`alike`].
pub fn folded(key: &str) -> Cow<'_, str> {
    if key.is_ascii() {
        if key.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(key.to_ascii_lowercase())
        } else {
            Cow::Borrowed(key)
        }
    } else {
        Cow::Owned(key.chars().map(fold).collect())
    }
}

/// One character of each set that Unicode simple case folding makes one:
/// the lower case of its upper case, each taken only where Unicode maps
/// the character to one character (the simple mappings: `ß` upper cases
/// to `SS` in full only, so stays `ß`; `ẞ` lower cases to `ß`).
fn fold(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    match c {
        // Upper cases to `I`, but folds to nothing else.
        'ı' => return c,
        // Folded together (CaseFolding.txt), while their case mappings,
        // multi-character, keep them apart.
        '\u{1FD3}' => return '\u{390}',
        '\u{1FE3}' => return '\u{3B0}',
        '\u{FB05}' => return '\u{FB06}',
        _ => {}
    }
    let upper = single(c.to_uppercase()).unwrap_or(c);
    single(upper.to_lowercase()).unwrap_or(upper)
}

/// The only character of `chars`, if it has exactly one.
fn single(mut chars: impl Iterator<Item = char>) -> Option<char> {
    let first = chars.next()?;
    chars.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fold_as_unicode_simple_case_folding_does() {
        use regex_syntax::hir::{Class, ClassUnicode, ClassUnicodeRange, HirKind};
        // Unicode's simple case folding, as regex-syntax tables it, over
        // the characters its Unicode version assigns: every set it makes
        // one folds to one character, and no two sets to the same.
        let hir = regex_syntax::parse(r"\p{Assigned}").expect("class");
        let HirKind::Class(Class::Unicode(assigned)) = hir.kind() else {
            panic!("not a class: {hir:?}");
        };
        let mut sets: std::collections::HashMap<char, char> = Default::default();
        for c in assigned.iter().flat_map(|r| r.start()..=r.end()) {
            let mut set = ClassUnicode::new([ClassUnicodeRange::new(c, c)]);
            set.case_fold_simple();
            let smallest = set.ranges()[0].start();
            for other in set.iter().flat_map(|r| r.start()..=r.end()) {
                assert_eq!(fold(other), fold(c), "{c:?} and {other:?} fold apart");
            }
            if let Some(seen) = sets.insert(fold(c), smallest) {
                assert_eq!(seen, smallest, "{c:?} folds as {seen:?}, of another set");
            }
        }
        assert!(sets.len() > 100_000, "{}", sets.len());
    }

    #[test]
    fn keys_are_alike_as_a_go_server_matches_them() {
        for (a, b) in [
            ("params", "params"),
            ("params", "PARAMS"),
            ("params", "param\u{17F}"), // long s
            ("arguments", "ARGUMENT\u{17F}"),
            ("kind", "\u{212A}ind"),          // Kelvin sign
            ("stra\u{DF}e", "STRA\u{1E9E}E"), // ß, capital ẞ
            ("\u{3C3}", "\u{3C2}"),           // σ, final ς
            ("\u{3A3}", "\u{3C2}"),           // Σ
            ("\u{B5}", "\u{39C}"),            // micro sign, capital mu
            ("\u{C5}", "\u{212B}"),           // Å, Ångström sign
            ("\u{1C5}", "\u{1C6}"),           // ǅ, ǆ
        ] {
            assert!(alike(a, b), "{a:?} {b:?}");
            assert!(alike(b, a), "{b:?} {a:?}");
            assert_eq!(folded(a), folded(b), "{a:?} {b:?}");
        }
        for (a, b) in [
            ("params", "param"),
            ("strasse", "stra\u{DF}e"), // full folding only
            ("id", "\u{131}d"),         // dotless ı: Turkic folding only
            ("id", "\u{130}d"),         // dotted İ
            ("\u{131}", "\u{130}"),
            ("name", "n\u{430}me"), // Cyrillic а: alike to the eye only
            ("name", "name "),
        ] {
            assert!(!alike(a, b), "{a:?} {b:?}");
            assert_ne!(folded(a), folded(b), "{a:?} {b:?}");
        }
    }
}
