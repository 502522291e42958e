//! Policy slices: the policies whose scope can match a request's principal
//! and action, so Cedar evaluates a handful instead of the whole set.
//!
//! Cedar evaluates every policy in the set it is given, and a policy costs
//! about a microsecond even when its scope rules it out; with thousands of
//! per-agent policies that dominates. A policy's scope is checked before
//! its conditions (`principal && action && resource && when ...`, short
//! circuit), so a policy whose scope cannot match is never satisfied and
//! never errs: leaving it out changes neither the decision nor its
//! reasons nor its errors. The slice is a superset of the policies that
//! can match: `principal == X` is kept only for X, `action == A` and
//! `action in [..]` only for the actions they name or whose groups they
//! name; every other constraint (`principal in`, `is`, no constraint)
//! keeps the policy in every slice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cedar_policy::{ActionConstraint, EntityUid, Policy, PolicySet, PrincipalConstraint, Schema};
use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::Weighter;

/// Most policy references held in cached slices, summed: bounds memory
/// even when every slice holds most of a large set.
const MAX_CACHED_POLICY_REFS: u64 = 1_000_000;

/// What a policy's scope says about principal and action.
struct Scope {
    /// `principal == X`: only X.
    principal: Option<EntityUid>,
    /// `action == A` or `action in [..]`: the actions (or groups) named.
    actions: Option<Vec<EntityUid>>,
}

/// A policy set, sliced lazily per (principal, action).
pub struct Slices {
    policies: Vec<(Policy, Scope)>,
    /// Each action's ancestors (action groups), from the schema.
    groups: HashMap<EntityUid, HashSet<EntityUid>>,
    cache: Cache<SliceKey, Arc<Slice>, PolicyRefs, foldhash::fast::RandomState>,
}

/// A registered agent and a route's action, both the config's.
type SliceKey = (EntityUid, EntityUid);

/// The policies one (principal, action) can meet, and how many they are:
/// counted once, where the cache weighs entries on every eviction.
pub struct Slice {
    pub set: PolicySet,
    refs: u64,
}

/// Weighs a slice by its policies, so the bound is on references held.
#[derive(Clone)]
struct PolicyRefs;

impl Weighter<SliceKey, Arc<Slice>> for PolicyRefs {
    fn weight(&self, _: &SliceKey, slice: &Arc<Slice>) -> u64 {
        slice.refs
    }
}

/// Slices held at most, whatever their weight.
const MAX_CACHED_SLICES: usize = 65_536;

impl Slices {
    /// Slices of `set`, whose action groups `schema` declares.
    pub fn new(set: &PolicySet, schema: &Schema) -> Slices {
        let policies = set
            .policies()
            .map(|p| {
                let principal = match p.principal_constraint() {
                    PrincipalConstraint::Eq(uid) => Some(uid),
                    _ => None,
                };
                let actions = match p.action_constraint() {
                    ActionConstraint::Any => None,
                    ActionConstraint::Eq(uid) => Some(vec![uid]),
                    ActionConstraint::In(uids) => Some(uids),
                };
                (p.clone(), Scope { principal, actions })
            })
            .collect();
        let mut groups = HashMap::new();
        if let Ok(actions) = schema.action_entities() {
            for action in actions.iter() {
                let uid = action.uid();
                let ancestors = actions
                    .ancestors(&uid)
                    .map(|a| a.cloned().collect())
                    .unwrap_or_default();
                groups.insert(uid, ancestors);
            }
        }
        Slices {
            policies,
            groups,
            // Keyed by a registered agent and a route's action, both the
            // config's: foldhash, where SipHash over the two ids was half
            // of a lookup.
            cache: Cache::with(
                MAX_CACHED_SLICES,
                MAX_CACHED_POLICY_REFS,
                PolicyRefs,
                foldhash::fast::RandomState::default(),
                DefaultLifecycle::default(),
            ),
        }
    }

    /// The policies that can match `principal` doing `action`.
    pub fn get(&self, principal: &EntityUid, action: &EntityUid) -> Arc<Slice> {
        let key = (principal.clone(), action.clone());
        let built = self.cache.get_or_insert_with(&key, || {
            let set = self.build(principal, action);
            // Even an empty slice weighs something, so the count bounds it.
            let refs = (set.policies().count() as u64).max(1);
            Ok::<_, std::convert::Infallible>(Arc::new(Slice { set, refs }))
        });
        match built {
            Ok(slice) => slice,
            Err(never) => match never {},
        }
    }

    fn build(&self, principal: &EntityUid, action: &EntityUid) -> PolicySet {
        let ancestors = self.groups.get(action);
        let in_scope = |scope: &Scope| {
            scope.principal.as_ref().is_none_or(|p| p == principal)
                && scope.actions.as_ref().is_none_or(|named| {
                    named
                        .iter()
                        .any(|n| n == action || ancestors.is_some_and(|a| a.contains(n)))
                })
        };
        let selected = self
            .policies
            .iter()
            .filter(|(_, scope)| in_scope(scope))
            .map(|(p, _)| p.clone());
        // Ids are unique in the whole set, so in any part of it; were that
        // ever not so, the empty set denies (fail closed).
        PolicySet::from_policies(selected).unwrap_or_else(|e| {
            log::error!("cannot slice the policy set: {e}");
            PolicySet::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use cedar_policy::{Authorizer, Context, Entities, Request};

    use super::*;

    const SCHEMA: &str = r#"
        entity Agent;
        entity Repo;
        action Read, Write appliesTo { principal: [Agent], resource: [Repo] };
        action "Delete" in ["Write"] appliesTo { principal: [Agent], resource: [Repo] };
    "#;

    const POLICIES: &str = r#"
        permit(principal == Agent::"a", action == Action::"Read", resource);
        permit(principal == Agent::"b", action in [Action::"Read", Action::"Write"], resource);
        permit(principal, action in Action::"Write", resource) when { resource == Repo::"scratch" };
        forbid(principal == Agent::"a", action, resource == Repo::"secret");
        permit(principal in Agent::"b", action == Action::"Delete", resource);
        forbid(principal, action == Action::"Delete", resource) when { resource == Repo::"prod" };
        permit(principal is Agent, action, resource) when { resource == Repo::"public" };
    "#;

    /// Every principal, action and resource: the sliced set decides
    /// exactly as the whole set, with the same reasons and errors, and
    /// holds fewer policies.
    #[test]
    fn a_slice_decides_exactly_as_the_whole_set() {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA).expect("schema");
        let set = PolicySet::from_str(POLICIES).expect("policies");
        let slices = Slices::new(&set, &schema);
        let entities = Entities::empty()
            .add_entities(schema.action_entities().expect("actions"), None)
            .expect("entities");
        let authorizer = Authorizer::new();
        let uid = |s: &str| EntityUid::from_str(s).expect("uid");
        let mut smaller = 0;
        for principal in ["Agent::\"a\"", "Agent::\"b\"", "Agent::\"c\""] {
            for action in [
                "Action::\"Read\"",
                "Action::\"Write\"",
                "Action::\"Delete\"",
            ] {
                let slice = slices.get(&uid(principal), &uid(action));
                if slice.set.policies().count() < set.policies().count() {
                    smaller += 1;
                }
                for resource in [
                    "Repo::\"x\"",
                    "Repo::\"scratch\"",
                    "Repo::\"secret\"",
                    "Repo::\"prod\"",
                    "Repo::\"public\"",
                ] {
                    let request = Request::new(
                        uid(principal),
                        uid(action),
                        uid(resource),
                        Context::empty(),
                        None,
                    )
                    .expect("request");
                    let whole = authorizer.is_authorized(&request, &set, &entities);
                    let sliced = authorizer.is_authorized(&request, &slice.set, &entities);
                    let facts = |r: &cedar_policy::Response| {
                        let mut reasons: Vec<String> =
                            r.diagnostics().reason().map(|p| p.to_string()).collect();
                        reasons.sort();
                        (r.decision(), reasons, r.diagnostics().errors().count())
                    };
                    assert_eq!(
                        facts(&whole),
                        facts(&sliced),
                        "{principal} {action} {resource}"
                    );
                }
            }
        }
        assert_eq!(smaller, 9, "every slice leaves something out");
    }
}
