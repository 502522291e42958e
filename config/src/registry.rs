//! The agent registry as written by operators: every identity Tether admits
//! belongs to an agent with a named human owner and a lifecycle.

use std::borrow::Cow;
use std::path::Path;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::macros::format_description;
use time::{Date, OffsetDateTime, Time};

use crate::{parse_yaml, read_file, ConfigError};

/// A separate registry file: `agents: [...]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    /// The registered agents.
    #[serde(default)]
    pub agents: Vec<AgentSpec>,
}

impl RegistryFile {
    /// Reads and parses a registry file, returning it with its text (for
    /// locating later validation errors).
    pub fn load(path: &Path) -> Result<(RegistryFile, String), ConfigError> {
        let text = read_file(path)?;
        let registry = parse_yaml(&text, path)?;
        Ok((registry, text))
    }
}

/// One registered agent.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// The agent's SPIFFE ID, e.g. `spiffe://example.org/agents/triage`.
    pub id: String,
    /// The human who answers for the agent (a name or an email). Required:
    /// no owner, no access.
    #[serde(deserialize_with = "named_owner")]
    pub owner: String,
    /// The owner's team.
    #[serde(default, deserialize_with = "not_null")]
    pub team: String,
    /// What the agent is for, in a sentence.
    #[serde(default, deserialize_with = "not_null")]
    pub purpose: String,
    /// The end of the agent's business purpose: a date (`2027-06-30`, valid
    /// through the end of that day, UTC) or an RFC 3339 instant.
    pub expires: Expiry,
    /// When the owner must next review the agent's access (a date). Past
    /// it, requests are still served but audit lines say `review_overdue`.
    #[serde(default)]
    pub review_by: Option<Expiry>,
    /// Lifecycle state.
    #[serde(default)]
    pub state: AgentState,
}

/// A string that must be written: YAML reads `owner: ~` (or `null`) into
/// a `String` as the text `~`, which would pass for a named owner.
pub(crate) fn not_null<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Option::<String>::deserialize(d)?
        .ok_or_else(|| serde::de::Error::custom("is null: write a value, or leave the field out"))
}

/// [`not_null`] for `owner`, saying which field it is (a custom error is
/// located at the agent, not the field).
fn named_owner<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Option::<String>::deserialize(d)?.ok_or_else(|| {
        serde::de::Error::custom("`owner` is null: every agent needs a named human owner")
    })
}

/// Where an agent is in its lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Allowed to act, subject to policy.
    #[default]
    Active,
    /// Temporarily barred (e.g. during an incident).
    Suspended,
    /// Gone for good: its owner moved on or its purpose ended.
    Offboarded,
}

impl AgentState {
    /// The state's name as written in the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Active => "active",
            AgentState::Suspended => "suspended",
            AgentState::Offboarded => "offboarded",
        }
    }
}

/// An instant after which something no longer holds. Written as a date or
/// an RFC 3339 instant; a date means "through the end of that day, UTC".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Expiry {
    /// The first instant at which it has expired.
    pub at: OffsetDateTime,
    /// Whether it was written as a plain date (kept for round-tripping).
    date_only: bool,
}

impl Expiry {
    /// Parses `2027-06-30` or `2027-06-30T12:00:00Z`.
    pub fn parse(text: &str) -> Result<Expiry, String> {
        let date_format = format_description!("[year]-[month]-[day]");
        if let Ok(date) = Date::parse(text, date_format) {
            let end_of_day = date
                .next_day()
                .map(|d| d.with_time(Time::MIDNIGHT).assume_utc())
                .unwrap_or(OffsetDateTime::new_utc(date, Time::MAX));
            return Ok(Expiry {
                at: end_of_day,
                date_only: true,
            });
        }
        OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map(|at| Expiry {
                at,
                date_only: false,
            })
            .map_err(|_| format!("`{text}` is not a date (YYYY-MM-DD) or an RFC 3339 instant"))
    }

    /// Whether it has expired at `now`.
    pub fn has_passed(&self, now: OffsetDateTime) -> bool {
        now >= self.at
    }

    /// As written: the date, or the RFC 3339 instant.
    pub fn to_text(&self) -> String {
        if self.date_only {
            let last_day = self.at.date().previous_day().unwrap_or(self.at.date());
            last_day.to_string()
        } else {
            self.at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        }
    }
}

impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Expiry::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Expiry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_text())
    }
}

impl JsonSchema for Expiry {
    fn schema_name() -> Cow<'static, str> {
        "Expiry".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "description": "A date (YYYY-MM-DD, through the end of that day UTC) or an RFC 3339 instant.",
            "type": "string",
            "anyOf": [{ "format": "date" }, { "format": "date-time" }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn a_date_lasts_through_the_end_of_its_day() {
        let e = Expiry::parse("2027-06-30").expect("date");
        assert!(!e.has_passed(datetime!(2027-06-30 23:59:59 UTC)));
        assert!(e.has_passed(datetime!(2027-07-01 00:00:00 UTC)));
        assert_eq!(e.to_text(), "2027-06-30");
    }

    #[test]
    fn an_instant_expires_at_that_instant() {
        let e = Expiry::parse("2027-06-30T12:00:00Z").expect("instant");
        assert!(!e.has_passed(datetime!(2027-06-30 11:59:59 UTC)));
        assert!(e.has_passed(datetime!(2027-06-30 12:00:00 UTC)));
    }

    #[test]
    fn garbage_is_refused_with_the_input_named() {
        let err = Expiry::parse("next tuesday").expect_err("not a date");
        assert!(err.contains("`next tuesday`"), "{err}");
    }
}
