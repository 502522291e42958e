//! What a cached decision costs in memory. The issue's budget is 64 MiB of
//! RSS for the whole proxy under load with 100,000 decisions cached. Every
//! byte the allocator hands out while the cache fills is counted (this test
//! binary's global allocator is an instrumented one), so the bound is exact
//! and repeatable, never timed.

use std::alloc::System;
use std::sync::Mutex;

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
/// cache's slab and index. Measured: 264 while it fills, so 100,000 take
/// 25 MiB, and 270 once it evicts. (With moka and the old key it was about
/// 900; with quick_cache's default share of ghosts, 480 once evicting.)
const BUDGET_PER_DECISION: usize = 288;

#[test]
fn a_cached_decision_stays_within_its_memory_budget() {
    let (per_decision, held_decisions) = bytes_per_cached_decision(default_max_entries());
    // The cache's bound is approximate (quick_cache evicts as each shard
    // fills): nearly all of them are held.
    assert!(
        held_decisions >= default_max_entries() * 99 / 100,
        "{held_decisions} held"
    );
    assert!(
        per_decision <= BUDGET_PER_DECISION,
        "{per_decision} bytes per cached decision, over the budget of {BUDGET_PER_DECISION}"
    );
}

/// Once the cache is full and evicting, it also remembers keys it evicted
/// (to bring them back hot if they return); each such ghost takes a slot.
/// The cache still stays within its budget per decision held.
#[test]
fn a_full_cache_that_keeps_evicting_stays_within_the_budget() {
    let (per_decision, held_decisions) = bytes_per_cached_decision(default_max_entries() * 5 / 2);
    assert!(
        held_decisions >= default_max_entries() * 9 / 10
            && held_decisions <= default_max_entries() * 101 / 100,
        "{held_decisions} held"
    );
    assert!(
        per_decision <= BUDGET_PER_DECISION,
        "{per_decision} bytes per cached decision, over the budget of {BUDGET_PER_DECISION}"
    );
}

/// The decision cache's size by default, which the proxy uses too.
fn default_max_entries() -> usize {
    tether_config::Cache::default().max_entries as usize
}

/// Sends `requests` requests, each for its own repository, through the
/// chain to the decision cache (sized as the proxy sizes it from the
/// config's defaults); returns the bytes the cache holds afterwards per
/// decision it holds, and how many it holds.
fn bytes_per_cached_decision(requests: usize) -> (usize, usize) {
    let (held, held_decisions) = bytes_held(requests, "acme-platform-repo-");
    let per_decision = held / held_decisions;
    println!("{per_decision} bytes per cached decision ({held} for {held_decisions} after {requests} requests)");
    (per_decision, held_decisions)
}

/// A cache that fills with decisions on long resource ids holds as many
/// bytes as one of ordinary decisions at most, give or take an entry's
/// worth of id each: its bound is in bytes, not only in entries.
#[test]
fn decisions_on_long_resource_ids_are_bounded_in_bytes_too() {
    // Four thousand bytes a repository name, and enough of them to take
    // 80 MB were each to count as one entry.
    let name = "r".repeat(4000);
    let (held, held_decisions) = bytes_held(20_000, &name);
    let bound = default_max_entries() * (BUDGET_PER_DECISION + 256);
    println!("{held} bytes held for {held_decisions} decisions on 4,000-byte ids");
    assert!(held <= bound, "{held} bytes held, over {bound}");
    assert!(
        held_decisions > 1000,
        "{held_decisions} held: still a cache"
    );
}

/// [`bytes_per_cached_decision`]'s measurement, for repositories named
/// `{prefix}{n:06}`: the bytes the cache holds and the decisions.
fn bytes_held(requests: usize, prefix: &str) -> (usize, usize) {
    // The allocator's counts are process-wide: one measurement at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let world = world::World::new(10);
    let cache = world.cache(&Metrics::new().expect("metrics"));
    let stages = Chain::new(world.stages_before_authorize());
    let region = Region::new(GLOBAL);
    for n in 0..requests {
        // Requests as the proxy sees them, named as long as real
        // repositories are; what a request allocates and frees nets out,
        // what the cache keeps remains.
        let (mut req, mut ctx) = world.request_to(&format!("/v1/repos/{prefix}{n:06}/issues"));
        stages
            .run(&mut req, &mut ctx)
            .expect("the stages before authorize pass");
        let input = DecisionInput::of(&ctx).expect("identity, lifecycle and route have run");
        let (decision, hit) = cache.decide(&world.snapshot, input);
        assert!(decision.allowed && !hit, "{decision:?}");
    }
    let held_decisions = cache.entry_count() as usize;
    let change = region.change();
    // Reallocations are already counted in both totals.
    let held = change.bytes_allocated as isize - change.bytes_deallocated as isize;
    (held as usize, held_decisions)
}
