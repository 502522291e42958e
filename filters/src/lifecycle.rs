//! Who answers for the caller: every identity must be a registered agent
//! with a named human owner, in the active state, before its expiry.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use cedar_policy::{EntityId, EntityTypeName, EntityUid};
use http::HeaderValue;
use pingora_http::RequestHeader;
use tether_config::spiffe::SpiffeId;
use tether_config::{AgentSpec, AgentState, Expiry};
use time::OffsetDateTime;

use crate::{Denial, Filter, Reason, RequestCtx};

/// A registered agent, ready for the request path.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// The human who answers for it.
    pub owner: Arc<str>,
    /// The owner's team.
    pub team: Arc<str>,
    /// What it is for.
    pub purpose: Arc<str>,
    /// When its business purpose ends.
    pub expires: Expiry,
    /// When its access is next due for review.
    pub review_by: Option<Expiry>,
    /// Its lifecycle state.
    pub state: AgentState,
    /// The Cedar principal, built once at load.
    pub uid: EntityUid,
    /// Its SPIFFE ID and owner as header values for the upstream, built
    /// once at load. Their bytes are shared: adding them to a request,
    /// and pingora copying that request for the upstream, copy nothing.
    pub id_header: HeaderValue,
    pub owner_header: HeaderValue,
}

impl Agent {
    /// Whether the owner's review date has passed at `now`.
    pub fn review_overdue(&self, now: OffsetDateTime) -> bool {
        self.review_by.is_some_and(|r| r.has_passed(now))
    }
}

/// Every registered agent, by SPIFFE ID.
///
/// Hashed with foldhash, not SipHash: the keys are the config's, so a
/// caller can only look up, never add a colliding key, and SipHash over a
/// 40-byte id was a quarter of this stage's work.
#[derive(Debug, Default)]
pub struct Registry {
    agents: HashMap<Arc<str>, Arc<Agent>, foldhash::fast::RandomState>,
}

impl Registry {
    /// Builds the registry from validated specs; principals are of
    /// `principal_type`.
    pub fn new(specs: &[AgentSpec], principal_type: &EntityTypeName) -> Result<Registry, String> {
        let mut agents = HashMap::with_capacity_and_hasher(specs.len(), Default::default());
        for spec in specs {
            let id = SpiffeId::parse(&spec.id)?;
            let header = |text: &str| {
                HeaderValue::from_maybe_shared(Bytes::copy_from_slice(text.as_bytes())).map_err(
                    |_| format!("agent `{}`: `{text}` cannot be sent in a header", spec.id),
                )
            };
            let agent = Agent {
                id_header: header(id.as_str())?,
                owner_header: header(&spec.owner)?,
                uid: EntityUid::from_type_name_and_id(
                    principal_type.clone(),
                    EntityId::new(id.as_str()),
                ),
                owner: spec.owner.as_str().into(),
                team: spec.team.as_str().into(),
                purpose: spec.purpose.as_str().into(),
                expires: spec.expires,
                review_by: spec.review_by,
                state: spec.state,
                id,
            };
            if agents
                .insert(agent.id.as_arc().clone(), Arc::new(agent))
                .is_some()
            {
                return Err(format!("agent `{}` is registered twice", spec.id));
            }
        }
        Ok(Registry { agents })
    }

    /// The agent with this SPIFFE ID.
    pub fn get(&self, id: &str) -> Option<&Arc<Agent>> {
        self.agents.get(id)
    }

    /// Every agent, in no particular order.
    pub fn agents(&self) -> impl Iterator<Item = &Arc<Agent>> {
        self.agents.values()
    }

    /// How many agents are registered.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}

/// Requires a registered, active, unexpired agent behind the principal.
pub struct Lifecycle;

impl Filter for Lifecycle {
    fn name(&self) -> &'static str {
        "lifecycle"
    }

    fn apply(&self, _req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        let Some(principal) = &ctx.principal else {
            return Err(Denial::new(Reason::NoIdentity, "no principal"));
        };
        let Some(agent) = ctx.snapshot.registry.get(principal.id.as_str()) else {
            return Err(Denial::new(
                Reason::Unregistered,
                format!("`{}` is not a registered agent", principal.id),
            ));
        };
        // Recorded before it is judged: a refused agent's audit line still
        // names the human who answers for it.
        ctx.agent = Some(agent.clone());
        if agent.state != AgentState::Active {
            return Err(Denial::new(
                Reason::Inactive,
                format!("agent `{}` is {}", agent.id, agent.state.as_str()),
            ));
        }
        let now = OffsetDateTime::from(ctx.started);
        if agent.expires.has_passed(now) {
            return Err(Denial::new(
                Reason::Expired,
                format!(
                    "agent `{}` expired at {}",
                    agent.id,
                    agent.expires.to_text()
                ),
            ));
        }
        // Every agent the subject's authority passed through answers for
        // this request too: each must be registered and live.
        if let Some(delegation) = &principal.delegation {
            for actor in &delegation.actors {
                let live =
                    ctx.snapshot.registry.get(actor.as_str()).is_some_and(|a| {
                        a.state == AgentState::Active && !a.expires.has_passed(now)
                    });
                if !live {
                    return Err(Denial::new(
                        Reason::UnregisteredActor,
                        format!(
                            "`{actor}` in the delegation chain is not a registered, active agent"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use crate::{IdentityKind, Principal};

    fn run(id: &str) -> Result<RequestCtx, Denial> {
        let mut ctx = testing::ctx();
        ctx.principal = Some(Principal {
            id: SpiffeId::parse(id).expect("id"),
            kind: IdentityKind::X509Svid,
            delegation: None,
        });
        Lifecycle.apply(&mut testing::get("/"), &mut ctx)?;
        Ok(ctx)
    }

    #[test]
    fn lifecycle_table() {
        for (id, expected) in [
            (testing::ALICE_BOT, Reason::Allowed),
            ("spiffe://example.org/agents/stranger", Reason::Unregistered),
            (testing::EXPIRED_BOT, Reason::Expired),
            (testing::SUSPENDED_BOT, Reason::Inactive),
            (testing::OFFBOARDED_BOT, Reason::Inactive),
        ] {
            let got = run(id)
                .map(|_| Reason::Allowed)
                .unwrap_or_else(|d| d.reason);
            assert_eq!(got, expected, "{id}");
        }
    }

    #[test]
    fn every_actor_in_a_delegation_chain_must_be_live() {
        for (actors, expected) in [
            (vec![testing::BOB_BOT, testing::ALICE_BOT], Reason::Allowed),
            (
                vec!["spiffe://example.org/agents/stranger", testing::ALICE_BOT],
                Reason::UnregisteredActor,
            ),
            (
                vec![testing::SUSPENDED_BOT, testing::ALICE_BOT],
                Reason::UnregisteredActor,
            ),
            (
                vec![testing::EXPIRED_BOT, testing::ALICE_BOT],
                Reason::UnregisteredActor,
            ),
        ] {
            let mut ctx = testing::ctx();
            ctx.principal = Some(Principal {
                id: SpiffeId::parse(testing::ALICE_BOT).expect("id"),
                kind: IdentityKind::X509Svid,
                delegation: Some(Arc::new(crate::context::Delegation {
                    subject: "alice@example.com".into(),
                    actors: actors
                        .iter()
                        .map(|a| SpiffeId::parse(a).expect("id"))
                        .collect(),
                })),
            });
            let got = Lifecycle
                .apply(&mut testing::get("/"), &mut ctx)
                .map(|_| Reason::Allowed)
                .unwrap_or_else(|d| d.reason);
            assert_eq!(got, expected, "{actors:?}");
        }
    }

    #[test]
    fn the_agent_and_its_owner_are_recorded() {
        let ctx = run(testing::ALICE_BOT).expect("allowed");
        let agent = ctx.agent.expect("agent");
        assert_eq!(&*agent.owner, "alice@example.com");
        assert_eq!(&*agent.team, "platform");
    }
}
