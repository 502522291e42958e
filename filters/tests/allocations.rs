//! What a request allocates on its way through the chain and into its
//! audit line, on a decision-cache hit (nearly every request of an agent
//! at work). An allocation is cheap alone, but the proxy makes dozens per
//! request (pingora's own are about 35), and each is CPU and a cache
//! line. Tether's stages allocate nothing: the request id's bytes are
//! made with the context, the identity headers' names are static and
//! their values shared. (A request as pingora parses it has no room to
//! spare, and making room for the headers the chain adds costs its header
//! map two allocations, index and entries, once; this test's request has
//! room. Through pingora's `insert_header` each header cost two more: a
//! copy of its name, as `http` copies every custom name given as text,
//! shared with a second map of names in their original case.) Counted
//! with an instrumented allocator, so exact and repeatable, never timed. The allocator counts
//! every thread: this binary holds one test, so nothing runs beside it.

use std::alloc::System;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tether_filters::record::{AuditRecord, Metrics};
use tether_filters::Reason;

#[path = "../benches/world.rs"]
mod world;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn a_cached_request_allocates_nothing_in_the_chain() {
    let world = world::World::new(world::CHAIN_WORLD_POLICIES);
    let metrics = Metrics::new().expect("metrics");
    let stages = world.stages(world.cache(&metrics), &metrics);
    // The first request fills the decision cache.
    let (mut req, mut ctx) = world.request();
    for stage in &stages {
        stage.apply(&mut req, &mut ctx).expect("allowed");
    }
    let (mut req, mut ctx) = world.request();
    for stage in &stages {
        let region = Region::new(GLOBAL);
        stage.apply(&mut req, &mut ctx).expect("allowed");
        let allocations = region.change().allocations + region.change().reallocations;
        assert_eq!(allocations, 0, "stage {} allocated", stage.name());
    }
    assert_eq!(ctx.cache_hit, Some(true), "decided from the cache");

    // pingora copies the request for the upstream: the identity headers'
    // bytes are shared with the copy, not copied again. (Compared with a
    // request edited the same way, whose map of names in their original
    // case is gone too.)
    let with_identity = allocations_to_copy(&req);
    let (mut without_identity, _) = world.request();
    tether_filters::headers::edit_request(&mut without_identity, 0, |_| ());
    assert_eq!(
        with_identity,
        allocations_to_copy(&without_identity),
        "copying the identity headers allocated"
    );

    // The audit line: only the resource's text (`Repo::"tether"`) is
    // built; the rest is borrowed from the request or formatted inline.
    let mut line = Vec::with_capacity(4096);
    let region = Region::new(GLOBAL);
    let record = AuditRecord::new(&ctx, "GET", Reason::Allowed, 200, None);
    serde_json::to_writer(&mut line, &record).expect("json");
    drop(record);
    let change = region.change();
    assert!(
        change.allocations + change.reallocations <= 1,
        "the audit record made {change:?}"
    );
    let json: serde_json::Value = serde_json::from_slice(&line).expect("the line is JSON");
    assert_eq!(json["request_id"], ctx.request_id.to_string());
    assert_eq!(json["client"], "127.0.0.1");
    assert_eq!(json["resource"], "Repo::\"tether\"");
}

fn allocations_to_copy(req: &pingora_http::RequestHeader) -> usize {
    let region = Region::new(GLOBAL);
    let copy = req.clone();
    let change = region.change();
    drop(copy);
    change.allocations + change.reallocations
}
