//! Finds the line and column of a field path such as `routes[2].action` in
//! YAML text.
//!
//! The YAML deserializer stamps the position of the node being read on any
//! error raised while reading it. So we walk the document with a probe that
//! descends along the path and raises an error on arrival: the error's
//! position is the node's. No second YAML parser is needed.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// The 1-based line and column of `field` in `text`, if it is there.
pub(crate) fn position(text: &str, field: &str) -> Option<(usize, usize)> {
    let steps = parse_path(field)?;
    let de = serde_norway::Deserializer::from_str(text);
    match (Probe { steps: &steps }).deserialize(de) {
        Ok(()) => None,
        Err(e) => e.location().map(|l| (l.line(), l.column())),
    }
}

fn parse_path(field: &str) -> Option<Vec<Step<'_>>> {
    let mut steps = Vec::new();
    for part in field.split('.').filter(|p| !p.is_empty()) {
        let (key, mut indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            steps.push(Step::Key(key));
        }
        while let Some(rest) = indexes.strip_prefix('[') {
            let close = rest.find(']')?;
            steps.push(Step::Index(rest[..close].parse().ok()?));
            indexes = &rest[close + 1..];
        }
    }
    Some(steps)
}

struct Probe<'p, 'a> {
    steps: &'p [Step<'a>],
}

/// Raised on arrival at the target node; only its position matters.
const FOUND: &str = "found";

impl<'de> DeserializeSeed<'de> for Probe<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.steps.is_empty() {
            // Make the deserializer read this node, then fail inside it.
            return deserializer.deserialize_any(Arrived);
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map or a sequence")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match self.steps.first() {
                Some(Step::Key(k)) if *k == key => {
                    return map.next_value_seed(Probe {
                        steps: &self.steps[1..],
                    })
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let target = match self.steps.first() {
            Some(Step::Index(i)) => Some(*i),
            _ => None,
        };
        let mut index = 0;
        loop {
            if Some(index) == target {
                return seq
                    .next_element_seed(Probe {
                        steps: &self.steps[1..],
                    })
                    .map(|_| ());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    // Scalars on the way are not where the path leads: nothing to find.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

struct Arrived;

impl<'de> Visitor<'de> for Arrived {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

#[cfg(test)]
mod tests {
    use super::position;

    const YAML: &str = "\
listener:
  address: nowhere
routes:
  - method: GET
    path: /a
  - method: PUT
    path: /b
    resource: {type: Repo, id: x}
";

    #[test]
    fn finds_scalars_nested_in_maps_and_lists() {
        assert_eq!(position(YAML, "listener.address"), Some((2, 12)));
        assert_eq!(position(YAML, "routes[1].path"), Some((7, 11)));
        assert_eq!(position(YAML, "routes[1].resource.id"), Some((8, 32)));
    }

    #[test]
    fn finds_whole_nodes() {
        assert_eq!(position(YAML, "routes[1]").map(|p| p.0), Some(6));
    }

    #[test]
    fn a_missing_path_has_no_position() {
        assert_eq!(position(YAML, "routes[5].path"), None);
        assert_eq!(position(YAML, "nothing.here"), None);
    }
}
