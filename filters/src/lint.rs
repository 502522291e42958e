//! Static checks of a loaded snapshot that are not errors but are almost
//! always mistakes: policies that can never apply, and routes that no
//! permit mentions (every request on them is denied).

use cedar_policy::{ActionConstraint, Effect, EntityUid, Policy, PrincipalConstraint};

use crate::Snapshot;

/// A finding, with what it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `policy `ID`` or `routes[N]`.
    pub subject: String,
    /// What is wrong and what follows from it.
    pub message: String,
}

impl Warning {
    /// A warning of Cedar's validator, which names its policy in its text
    /// (`for policy `ID`, …`).
    pub fn from_cedar(text: &str) -> Warning {
        let named = text
            .strip_prefix("for policy `")
            .and_then(|rest| rest.split_once("`, "));
        match named {
            Some((id, message)) => Warning {
                subject: format!("policy `{id}`"),
                message: message.to_string(),
            },
            None => Warning {
                subject: "policies".into(),
                message: text.to_string(),
            },
        }
    }
}

/// Every warning about `snapshot`: Cedar's, then Tether's.
pub fn lint(snapshot: &Snapshot) -> Vec<Warning> {
    let engine = &snapshot.policy;
    let actions = engine.schema.action_entities().ok();
    // `b in a`: equal, or `a` is an action group holding `b`.
    let action_in = |b: &EntityUid, a: &EntityUid| {
        a == b || actions.as_ref().is_some_and(|e| e.is_ancestor_of(a, b))
    };
    // Actions requests can carry: each route's, and on MCP routes every
    // action the schema applies to the route's resource or tool types.
    let mut routed: Vec<EntityUid> = snapshot
        .routes
        .iter()
        .map(|r| r.action_uid.clone())
        .collect();
    for route in snapshot.routes.iter() {
        if let Some(mcp) = &route.mcp {
            for action in engine.schema.actions() {
                let on = engine
                    .schema
                    .resources_for_action(action)
                    .into_iter()
                    .flatten();
                if on
                    .into_iter()
                    .any(|t| *t == route.resource_type || *t == mcp.tool_type)
                {
                    routed.push(action.clone());
                }
            }
        }
    }
    let applies_to = |policy: &Policy, action: &EntityUid| match policy.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(a) => action_in(action, &a),
        ActionConstraint::In(list) => list.iter().any(|a| action_in(action, a)),
    };

    let mut warnings = engine.warnings.clone();
    let mut policies: Vec<&Policy> = engine.set.policies().collect();
    policies.sort_by_key(|p| p.id().to_string());
    for policy in &policies {
        let subject = format!("policy `{}`", policy.id());
        if !routed.iter().any(|a| applies_to(policy, a)) {
            warnings.push(Warning {
                subject: subject.clone(),
                message: "can never apply: no route maps to an action it names".into(),
            });
        }
        if let PrincipalConstraint::Eq(p) = policy.principal_constraint() {
            let id = p.id().unescaped().to_string();
            if snapshot.registry.get(&id).is_none() {
                warnings.push(Warning {
                    subject,
                    message: format!("can never apply: principal `{id}` is not a registered agent"),
                });
            }
        }
    }
    for (i, route) in snapshot.routes.iter().enumerate() {
        let permitted = policies
            .iter()
            .any(|p| p.effect() == Effect::Permit && applies_to(p, &route.action_uid));
        if !permitted {
            warnings.push(Warning {
                subject: format!("routes[{i}]"),
                message: format!(
                    "no permit policy mentions action `{}`: every request to `{}` is denied",
                    route.action_uid, route.template
                ),
            });
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn the_test_world_has_one_unpermitted_route() {
        let warnings = lint(&testing::snapshot());
        assert_eq!(
            warnings,
            vec![Warning {
                subject: "routes[1]".into(),
                message: "no permit policy mentions action `Action::\"Admin\"`: every request to `/v1/admin` is denied".into(),
            }]
        );
    }

    #[test]
    fn policies_that_can_never_apply_are_found() {
        let snapshot = testing::snapshot_with(
            1,
            r#"@id("stale") permit(principal == Agent::"spiffe://example.org/agents/left-long-ago", action, resource);
               @id("admins") permit(principal, action == Action::"Admin", resource);
               @id("reads") permit(principal, action in [Action::"ListIssues"], resource);"#,
        );
        let subjects: Vec<(String, String)> = lint(&snapshot)
            .into_iter()
            .map(|w| (w.subject, w.message))
            .collect();
        assert_eq!(subjects.len(), 1, "{subjects:?}");
        assert_eq!(subjects[0].0, "policy `stale`");
        assert!(subjects[0].1.contains("not a registered agent"));
    }

    #[test]
    fn text_that_reads_as_one_thing_and_matches_another_is_found() {
        // `tеther` with a Cyrillic `е`: it looks like the repository and
        // never matches it.
        let snapshot = testing::snapshot_with(
            1,
            "@id(\"lookalike\") forbid(principal, action, resource == Repo::\"t\u{0435}ther\");\n\
             @id(\"plain\") permit(principal, action == Action::\"ListIssues\", resource);",
        );
        let warnings = lint(&snapshot);
        let lookalike: Vec<_> = warnings
            .iter()
            .filter(|w| w.subject == "policy `lookalike`")
            .collect();
        assert_eq!(lookalike.len(), 1, "{warnings:?}");
        assert!(
            lookalike[0].message.contains("mixed scripts"),
            "{warnings:?}"
        );
        assert!(
            !warnings.iter().any(|w| w.subject == "policy `plain`"),
            "{warnings:?}"
        );
    }
}
