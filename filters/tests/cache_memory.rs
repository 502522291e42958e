//! What a cached decision costs in memory. The budget is 64 MiB of
//! RSS for the whole proxy under load with 100,000 decisions cached. Every
//! byte the allocator hands out while the cache fills is counted (this test
//! binary's global allocator is an instrumented one), so the bound is exact
//! and repeatable, never timed.

use std::alloc::System;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tether_filters::authorize::DecisionInput;
use tether_filters::record::Metrics;
use tether_filters::Chain;

#[path = "../benches/world.rs"]
mod world;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes a cached decision may hold, allocator rounding aside: the key
/// (128 bytes, and the resource id's own allocation when it is over 23
/// bytes), a pointer to a shared decision and its deadline, and the
/// cache's slab and index. Measured: 256, so 100,000 take 25 MiB. (With
/// moka and the old key it was about 900.)
const BUDGET_PER_DECISION: usize = 288;

#[test]
fn a_cached_decision_stays_within_its_memory_budget() {
    const DECISIONS: usize = 100_000;
    let world = world::World::new(10);
    // Sized as the proxy sizes it from the config's defaults (100,000
    // decisions), so the frequency sketch is the one production carries,
    // amortized here over fewer entries.
    let cache = world.cache(&Metrics::new().expect("metrics"));
    let stages = Chain::new(world.stages_before_authorize());
    let region = Region::new(GLOBAL);
    let mut decisions = Vec::with_capacity(DECISIONS);
    for n in 0..DECISIONS {
        // Requests as the proxy sees them, each for its own repository,
        // named as long as real ones are; what a request allocates and
        // frees nets out, what the cache keeps remains.
        let (mut req, mut ctx) =
            world.request_to(&format!("/v1/repos/acme-platform-repo-{n:05}/issues"));
        stages
            .run(&mut req, &mut ctx)
            .expect("the stages before authorize pass");
        let input = DecisionInput::of(&ctx).expect("identity, lifecycle and route have run");
        let (decision, hit) = cache.decide(&world.snapshot, input);
        assert!(decision.allowed && !hit, "{decision:?}");
        decisions.push(decision);
    }
    // Drop what the test holds, so only the cache's own share remains.
    drop(decisions);
    // The cache's bound is approximate (quick_cache evicts as each shard
    // fills): nearly all of them are held.
    let held_decisions = cache.entry_count() as usize;
    assert!(
        held_decisions >= DECISIONS * 99 / 100,
        "{held_decisions} held"
    );
    let change = region.change();
    // Reallocations are already counted in both totals.
    let held = change.bytes_allocated as isize - change.bytes_deallocated as isize;
    let per_decision = held as usize / held_decisions;
    println!("{per_decision} bytes per cached decision ({held} for {held_decisions})");
    assert!(
        per_decision <= BUDGET_PER_DECISION,
        "{per_decision} bytes per cached decision, over the budget of {BUDGET_PER_DECISION}"
    );
}
