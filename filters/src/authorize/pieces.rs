//! Parsing and validating a large policy set on every core.
//!
//! Cedar parses and validates on one thread: with 10,000 policies that was
//! four fifths of Tether's start. A large file is cut into pieces at policy
//! ends and the pieces parsed side by side; the set is validated in slices
//! the same way. Strict validation judges each policy on its own, so the
//! slices find exactly what the whole set would.
//!
//! Only success is split. When a piece does not parse, or a slice does not
//! validate, the caller parses the whole file (or validates the whole set)
//! in one pass, so errors are located and ordered exactly as that pass
//! reports them. Cutting in the wrong place could only ever turn a good
//! file into that error path, never change what a good file means: a cut
//! is made only at a `;` outside any string or comment, which is where
//! Cedar's grammar ends a policy, and nowhere else.

use std::ops::Range;
use std::str::FromStr;

use cedar_policy::{Policy, PolicyId, PolicySet, Schema, ValidationMode, Validator};

use crate::lint::Warning;

/// Files smaller than this are parsed in one piece: a thread would cost
/// more than it saves.
const MIN_PIECE_BYTES: usize = 64 * 1024;

/// Sets smaller than this are validated in one slice.
const MIN_SLICE_POLICIES: usize = 1024;

/// Threads to use: one per core, at most 8.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// A file's policies in source order, parsed in up to `threads` pieces at
/// once; `None` when the file is small, or any piece fails to parse or
/// holds a template: then parse it whole.
pub fn parse(text: &str, threads: usize) -> Option<Vec<Policy>> {
    if threads < 2 || text.len() < MIN_PIECE_BYTES {
        return None;
    }
    parse_pieces(text, threads)
}

fn parse_pieces(text: &str, pieces: usize) -> Option<Vec<Policy>> {
    on_threads(split_at_policy_ends(text, pieces), |range| {
        parse_piece(&text[range])
    })
}

fn parse_piece(text: &str) -> Option<Vec<Policy>> {
    let set = PolicySet::from_str(text).ok()?;
    if set.templates().next().is_some() {
        return None;
    }
    Some(in_source_order(&set))
}

/// Runs `work` on each of `parts`, each on a thread of its own: the
/// results joined in order, or `None` when any part has none (or its
/// thread panicked).
fn on_threads<P: Send, T: Send>(
    parts: Vec<P>,
    work: impl Fn(P) -> Option<Vec<T>> + Sync,
) -> Option<Vec<T>> {
    let work = &work;
    let results: Vec<Option<Vec<T>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || work(part)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().ok().flatten())
            .collect()
    });
    let mut joined = Vec::new();
    for result in results {
        joined.extend(result?);
    }
    Some(joined)
}

/// The policies of a freshly parsed set, in source order. The parser names
/// them `policy0`, `policy1`, ... as it meets them; the set does not keep
/// that order.
pub fn in_source_order(set: &PolicySet) -> Vec<Policy> {
    let mut policies: Vec<Policy> = set.policies().cloned().collect();
    policies.sort_by_cached_key(|p| {
        p.id()
            .to_string()
            .trim_start_matches("policy")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    policies
}

/// `policies` renamed, each to `id(policy, its position)`, in up to
/// `threads` chunks at once: Cedar builds a renamed policy anew and drops
/// the old one, about a microsecond each.
pub fn rename(
    mut policies: Vec<Policy>,
    threads: usize,
    id: impl Fn(&Policy, usize) -> PolicyId + Sync,
) -> Vec<Policy> {
    let rename_chunk = |(first, chunk): (usize, Vec<Policy>)| -> Vec<Policy> {
        chunk
            .into_iter()
            .enumerate()
            .map(|(i, policy)| policy.new_id(id(&policy, first + i)))
            .collect()
    };
    if threads < 2 || policies.len() < MIN_SLICE_POLICIES {
        return rename_chunk((0, policies));
    }
    // Owned chunks, so each thread also drops the policies it replaced.
    let per_chunk = policies.len().div_ceil(threads);
    let mut chunks = Vec::with_capacity(threads);
    while policies.len() > per_chunk {
        let rest = policies.split_off(per_chunk);
        chunks.push(std::mem::replace(&mut policies, rest));
    }
    chunks.push(policies);
    let rename_chunk = &rename_chunk;
    std::thread::scope(|scope| {
        let mut first = 0;
        let workers: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let part = (first, chunk);
                first += part.1.len();
                scope.spawn(move || rename_chunk(part))
            })
            .collect();
        // A panic is Cedar's and would have happened on one thread too:
        // passed on, never turned into missing policies.
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Cuts `text` into at most `pieces` ranges of about equal length, each
/// ending just after a policy's closing `;` (the last one at the end of the
/// text). Strings (`"..."`, with `\` escapes) and `//` comments (to the end
/// of the line) are skipped as Cedar's lexer skips them.
fn split_at_policy_ends(text: &str, pieces: usize) -> Vec<Range<usize>> {
    #[derive(Clone, Copy)]
    enum In {
        Code,
        String,
        Escape,
        Comment,
    }
    let bytes = text.as_bytes();
    let target = bytes.len() / pieces.max(1);
    let mut ranges = Vec::with_capacity(pieces);
    let mut start = 0;
    let mut state = In::Code;
    let mut i = 0;
    while i < bytes.len() && ranges.len() + 1 < pieces {
        state = match (state, bytes[i]) {
            (In::Code, b'"') => In::String,
            (In::Code, b'/') if bytes.get(i + 1) == Some(&b'/') => {
                i += 1;
                In::Comment
            }
            (In::Code, b';') => {
                if i + 1 - start >= target {
                    ranges.push(start..i + 1);
                    start = i + 1;
                }
                In::Code
            }
            (In::String, b'\\') => In::Escape,
            (In::String, b'"') => In::Code,
            (In::Escape, _) => In::String,
            // Cedar's comment is `//[^\n\r]*`.
            (In::Comment, b'\n' | b'\r') => In::Code,
            (state, _) => state,
        };
        i += 1;
    }
    // The rest: a piece of its own unless the last cut was at the very end.
    if start < bytes.len() || ranges.is_empty() {
        ranges.push(start..bytes.len());
    }
    ranges
}

/// Validates `set` strictly against the schema `schema_text` in up to
/// `threads` slices at once: Cedar's warnings when no slice has an error;
/// `None` when the set is small or a slice has an error: then validate it
/// whole.
///
/// Each slice parses the schema itself. Validation clones and drops the
/// schema's shared types all the time; on one shared schema, two threads
/// spent more time bouncing those reference counts between cores than
/// validating, and took as long as one.
pub fn validate(schema_text: &str, policies: &[Policy], threads: usize) -> Option<Vec<Warning>> {
    if threads < 2 || policies.len() < MIN_SLICE_POLICIES {
        return None;
    }
    validate_slices(schema_text, policies, threads)
}

fn validate_slices(schema_text: &str, policies: &[Policy], slices: usize) -> Option<Vec<Warning>> {
    let per_slice = policies.len().div_ceil(slices.max(1)).max(1);
    on_threads(policies.chunks(per_slice).collect(), |slice| {
        validate_slice(schema_text, slice)
    })
}

fn validate_slice(schema_text: &str, slice: &[Policy]) -> Option<Vec<Warning>> {
    let (schema, _) = Schema::from_cedarschema_str(schema_text).ok()?;
    let set = PolicySet::from_policies(slice.iter().cloned()).ok()?;
    let result = Validator::new(schema).validate(&set, ValidationMode::Strict);
    if result.validation_errors().next().is_some() {
        return None;
    }
    Some(
        result
            .validation_warnings()
            .map(|w| Warning::from_cedar(&w.to_string()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use cedar_policy::PolicyId;
    use proptest::prelude::*;

    /// Policies with `;`, `"` and `//` where a careless cut would land:
    /// in strings, escapes, comments and annotations.
    const TRICKY: &[&str] = &[
        "permit(principal, action, resource);\n",
        "@id(\"semi;colon\")\npermit(principal, action, resource) when { \"a;b\" == \"a;b\" };\n",
        "// permit(principal, action, resource); a comment\nforbid(principal, action, resource) \
         unless { \"\\\";\" like \"*\" };\n",
        "permit(principal, action, resource) when { \"// not a comment;\" != \"\" }; // ;\"\n",
        "forbid(principal, action, resource) when { \"\\\\\" == \"\\\\\" };\r// tail; \"\r\n",
        "@id(\"é;ü\") permit(principal, action, resource) when { 2 * 2 == 4 && \"/\" like \"*/*\" };\n",
    ];

    fn ids_and_text(policies: &[Policy]) -> Vec<(String, String)> {
        policies
            .iter()
            .map(|p| {
                let id = p.annotations().find(|(k, _)| *k == "id");
                (
                    id.map(|(_, v)| v.to_string()).unwrap_or_default(),
                    p.to_string(),
                )
            })
            .collect()
    }

    fn whole(text: &str) -> Vec<Policy> {
        in_source_order(&PolicySet::from_str(text).expect("parses whole"))
    }

    proptest! {
        /// Any file of these policies, cut into any number of pieces, parses
        /// to the same policies in the same order as the whole file.
        #[test]
        fn pieces_parse_to_what_the_whole_file_parses_to(
            picks in prop::collection::vec(0..TRICKY.len(), 1..40),
            pieces in 1usize..9,
        ) {
            let text: String = picks.iter().map(|&i| TRICKY[i]).collect();
            let ranges = split_at_policy_ends(&text, pieces);
            prop_assert!(ranges.len() <= pieces);
            prop_assert_eq!(ranges.first().map(|r| r.start), Some(0));
            prop_assert_eq!(ranges.last().map(|r| r.end), Some(text.len()));
            prop_assert!(ranges.iter().all(|r| !r.is_empty()));
            for pair in ranges.windows(2) {
                prop_assert_eq!(pair[0].end, pair[1].start);
            }
            let cut = parse_pieces(&text, pieces).expect("every piece parses");
            prop_assert_eq!(ids_and_text(&cut), ids_and_text(&whole(&text)));
        }
    }

    #[test]
    fn large_files_are_cut_into_as_many_pieces_as_asked() {
        let text = TRICKY.concat().repeat(50);
        let ranges = split_at_policy_ends(&text, 4);
        assert_eq!(ranges.len(), 4);
        // Every piece but the last is at least a quarter of the text.
        for range in &ranges[..3] {
            assert!(range.len() >= text.len() / 4, "{range:?} of {}", text.len());
            assert!(text[..range.end].ends_with(';'));
        }
    }

    #[test]
    fn a_cut_never_lands_in_a_string_or_a_comment() {
        // One policy, its `;`s all inside a string or a comment but the last.
        let text = "permit(principal, action, resource) when { \"x;x;x;x\" == \"x;x;x;x\" } \
                    // ;;;;\n;";
        assert_eq!(split_at_policy_ends(text, 8), vec![0..text.len()]);
    }

    #[test]
    fn a_piece_that_does_not_parse_or_holds_a_template_sends_the_file_whole() {
        let good = TRICKY.concat();
        let broken =
            format!("{good}permit(principal, action, resource) when {{ \"open }};\n{good}");
        assert!(parse_pieces(&broken, 4).is_none());
        let template = format!("{good}permit(principal == ?principal, action, resource);\n{good}");
        assert!(parse_pieces(&template, 4).is_none());
        assert_eq!(parse_pieces(&good, 3).map(|p| p.len()), Some(TRICKY.len()));
    }

    #[test]
    fn small_inputs_and_one_thread_take_the_single_pass() {
        assert!(parse(&TRICKY.concat(), 8).is_none());
        let large = TRICKY
            .concat()
            .repeat(MIN_PIECE_BYTES / TRICKY.concat().len() + 1);
        assert!(parse(&large, 1).is_none());
        assert_eq!(parse(&large, 2).map(|p| p.len()), Some(whole(&large).len()));
    }

    #[test]
    fn slices_find_what_the_whole_set_finds() {
        let (schema, _) = Schema::from_cedarschema_str(testing::SCHEMA).expect("schema");
        let schema_text = testing::SCHEMA;
        let valid = |n: usize| -> PolicySet {
            let text: String = (0..n)
                .map(|i| {
                    // Every 700th team mixes scripts (a Cyrillic `а`): a
                    // warning, in each slice.
                    let team = if i % 700 == 1 { "te\u{430}m" } else { "team" };
                    format!(
                        "@id(\"p{i}\") permit(principal, action == Action::\"ListIssues\", \
                         resource) when {{ principal.team == \"{team}-{i}\" }};\n"
                    )
                })
                .collect();
            PolicySet::from_str(&text).expect("parses")
        };
        let set = valid(2 * MIN_SLICE_POLICIES);
        let whole = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        assert!(whole.validation_passed());
        let all: Vec<Policy> = set.policies().cloned().collect();
        let warnings = validate(schema_text, &all, 4).expect("validates in slices");
        assert_eq!(warnings.len(), whole.validation_warnings().count());
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        let few: Vec<Policy> = valid(10).policies().cloned().collect();
        assert!(
            validate(schema_text, &few, 4).is_none(),
            "small sets go whole"
        );

        // One bad policy anywhere sends the set whole.
        let mut policies = all;
        let bad = PolicySet::from_str(
            "@id(\"bad\") permit(principal, action == Action::\"ListIssues\", resource) \
             when { principal.no_such_attribute };",
        )
        .expect("parses");
        let bad = bad
            .policies()
            .next()
            .expect("one")
            .new_id(PolicyId::new("bad"));
        policies.insert(1500, bad);
        assert!(validate(schema_text, &policies, 4).is_none());
    }

    #[test]
    fn renaming_on_threads_names_each_policy_by_its_position() {
        let text: String = (0..MIN_SLICE_POLICIES + 5)
            .map(|i| format!("permit(principal, action, resource) when {{ {i} == {i} }};\n"))
            .collect();
        let policies = whole(&text);
        let id = |_: &Policy, n: usize| PolicyId::new(format!("f.cedar#{}", n + 1));
        for threads in [1, 2, 3, 8] {
            let renamed = rename(policies.clone(), threads, id);
            assert_eq!(renamed.len(), policies.len(), "{threads} threads");
            for (n, (new, old)) in renamed.iter().zip(&policies).enumerate() {
                assert_eq!(new.id().to_string(), format!("f.cedar#{}", n + 1));
                assert_eq!(new.to_string(), old.to_string(), "{threads} threads");
            }
        }
    }
}
