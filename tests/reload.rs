//! Hot reload, all or nothing: under continuous load on keep-alive
//! connections, 50 reloads (some invalid) never fail a request, never
//! drop a connection, and never decide a request under a mix of versions.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{post_reload, World, TRIAGE};

/// A policy set whose only permit is named `id`: the audit line says which
/// version decided.
fn version(id: &str) -> String {
    format!(
        "@id(\"{id}\")\npermit(principal, action in [Action::\"ReadIssues\", Action::\"CreateIssue\"], resource);\n"
    )
}

/// Fresh requests as TRIAGE, each answered 200, and which policy decided
/// each (the first of its audit line's): the version serving.
struct Decisions<'a> {
    w: &'a World,
    client: tether::client::Client,
    sent: std::cell::Cell<usize>,
}

impl<'a> Decisions<'a> {
    fn new(w: &'a World) -> Decisions<'a> {
        Decisions {
            w,
            client: w.sandbox.client(Some(TRIAGE)).expect("client"),
            sent: std::cell::Cell::new(0),
        }
    }

    fn next(&self) -> String {
        let r = self
            .w
            .rt
            .block_on(self.client.send("GET", "/v1/repos/tether/issues", &[]))
            .expect("response");
        assert_eq!(r.status, 200);
        self.sent.set(self.sent.get() + 1);
        let lines = self.w.sandbox.audit_lines(self.sent.get());
        lines[self.sent.get() - 1]["policies"][0]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Waits up to 10 s for metric `name` to read `value`.
fn wait_for(w: &World, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.metric(name) != value {
        assert!(Instant::now() < deadline, "{name} never reached {value}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fifty_reloads_under_load_fail_nothing_and_never_mix_versions() {
    let w = World::with(|c| c.reload.watch = false);
    let (rt, sandbox) = (&w.rt, &w.sandbox);
    let policies = sandbox.dir.path().join("policies/repos.cedar");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let client = sandbox.client(Some(TRIAGE)).expect("client");
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(rt.spawn(async move {
            // One connection per task for the whole test: a reload that
            // dropped connections would fail the next request.
            let mut conn = client.connect().await.expect("connect");
            while !stop.load(Ordering::Relaxed) {
                match conn.send("GET", "/v1/repos/tether/issues").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => panic!("request failed during reload: {r:?}"),
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        panic!("connection failed during reload: {e:#}");
                    }
                };
            }
        }));
    }

    let mut expected = std::collections::HashMap::from([(1u64, "agents-work-issues".to_string())]);
    let mut refused = 0;
    for i in 1..=50 {
        std::thread::sleep(Duration::from_millis(15));
        if i % 5 == 0 {
            std::fs::write(&policies, "permit(principal, action,").expect("write");
            let (status, body) = rt.block_on(post_reload(sandbox.admin));
            assert_eq!(status, 422, "{body}");
            assert!(
                body["errors"][0]
                    .as_str()
                    .unwrap_or("")
                    .contains("repos.cedar"),
                "{body}"
            );
            refused += 1;
        } else {
            let id = format!("v{i}");
            std::fs::write(&policies, version(&id)).expect("write");
            let (status, body) = rt.block_on(post_reload(sandbox.admin));
            assert_eq!(status, 200, "{body}");
            let generation = body["generation"].as_u64().expect("generation");
            expected.insert(generation, id);
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    for task in load {
        rt.block_on(task).expect("load task");
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    let served = ok.load(Ordering::Relaxed);
    assert!(served > 50, "only {served} requests under load");

    // Every request was decided entirely by the version its generation names.
    let lines = sandbox.audit_lines(served as usize);
    assert_eq!(lines.len() as u64, served);
    for line in &lines {
        let generation = line["generation"].as_u64().expect("generation");
        let id = expected
            .get(&generation)
            .unwrap_or_else(|| panic!("unknown generation in {line}"));
        assert_eq!(line["policies"], serde_json::json!([id]), "{line}");
    }
    assert_eq!(
        w.metric("tether_config_reload_failures_total"),
        f64::from(refused)
    );
    assert_eq!(w.metric("tether_config_generation"), 41.0);
    // The last attempt was invalid: the gauge says the old version serves.
    assert_eq!(w.metric("tether_config_last_reload_successful"), 0.0);
}

#[test]
fn a_configmap_symlink_swap_is_picked_up_and_a_bad_version_is_refused() {
    // A ConfigMap volume: versioned folders, `..data` pointing at the live
    // one, and the visible names pointing through `..data`.
    let cm = tempfile::tempdir().expect("dir");
    let publish = |name: &str, text: &str| {
        let dir = cm.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("repos.cedar"), text).expect("write");
        let tmp = cm.path().join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).expect("symlink");
        std::fs::rename(&tmp, cm.path().join("..data")).expect("swap");
    };
    publish("..v1", &version("v1"));
    std::os::unix::fs::symlink("..data/repos.cedar", cm.path().join("repos.cedar")).expect("link");
    let policies = cm.path().join("repos.cedar");
    let w = World::with(|c| {
        c.policy.policies = policies.clone();
        c.reload.poll_interval_ms = 100;
    });
    let decisions = Decisions::new(&w);
    assert_eq!(decisions.next(), "v1");

    publish("..v2", &version("v2"));
    wait_for(&w, "tether_config_generation", 2.0);
    assert_eq!(decisions.next(), "v2");

    publish(
        "..v3",
        "forbid(principal, action, resource) when { context.nope };",
    );
    wait_for(&w, "tether_config_reload_failures_total", 1.0);
    assert_eq!(w.metric("tether_config_generation"), 2.0);
    assert_eq!(decisions.next(), "v2", "the old version keeps serving");
}

#[test]
fn the_listener_certificate_rotates_without_dropping_connections() {
    let w = World::with(|c| c.reload.poll_interval_ms = 100);
    let (rt, sandbox) = (&w.rt, &w.sandbox);
    let client = sandbox.client(Some(TRIAGE)).expect("client");
    let mut open = rt.block_on(client.connect()).expect("connect");
    let before = open.server_certificate().expect("server certificate");
    let ok = |conn: &mut tether::client::Connection| {
        let r = rt
            .block_on(conn.send("GET", "/v1/repos/tether/issues"))
            .expect("response");
        assert_eq!(r.status, 200, "{r:?}");
    };
    ok(&mut open);

    // cert-manager writes a renewed certificate: key and chain replaced.
    let renewed = sandbox
        .pki
        .server(&["127.0.0.1", "localhost"])
        .expect("cert");
    for (name, text) in [
        ("server.pem", &renewed.cert_pem),
        ("server-key.pem", &renewed.key_pem),
    ] {
        let path = sandbox.dir.path().join("certs").join(name);
        std::fs::write(path.with_extension("tmp"), text).expect("write");
        std::fs::rename(path.with_extension("tmp"), &path).expect("rename");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut fresh = rt.block_on(client.connect()).expect("connect");
        let presented = fresh.server_certificate().expect("server certificate");
        ok(&mut fresh);
        if presented == renewed.der() {
            break;
        }
        assert_eq!(presented, before, "the old certificate until the new one");
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The connection opened before the rotation was never dropped.
    ok(&mut open);
    let listener_expiry = w.metric("tether_certificate_expiry_seconds{certificate=\"listener\"}");
    assert!(listener_expiry > 0.0, "{listener_expiry}");
}

#[test]
fn a_resumed_tls_session_is_verified_again_against_the_bundles_of_now() {
    // A resumed session brings back the chain of the handshake it resumes
    // without the certificate verifier seeing it: a CA the operator has
    // since removed must not keep vouching for it.
    use tether::client::Client;
    use tether_config::{AgentSpec, AgentState, Expiry, TrustDomain};
    use tether_filters::identity::pki::Pki;
    const OTHER: &str = "spiffe://other.org/agents/x";
    let other = Pki::new("other.org").expect("pki");
    let dir = tempfile::tempdir().expect("dir");
    let bundle = dir.path().join("other.pem");
    std::fs::write(&bundle, other.ca_pem()).expect("bundle");
    let configured = bundle.clone();
    let w = World::with(move |c| {
        c.trust_domains.push(TrustDomain {
            name: "other.org".into(),
            bundle: configured,
        });
        c.registry.agents.push(AgentSpec {
            id: OTHER.into(),
            owner: "olga@other.org".into(),
            team: "platform".into(),
            purpose: String::new(),
            expires: Expiry::parse("2999-12-31").expect("date"),
            review_by: None,
            state: AgentState::Active,
        });
    });
    let leaf = other.leaf(&[OTHER]).expect("leaf");
    let client = Client::resuming(
        w.sandbox.proxy,
        &w.sandbox.pki.ca_pem(),
        Some((&leaf.cert_pem, &leaf.key_pem)),
    )
    .expect("client");
    let send = || {
        w.rt.block_on(client.send("GET", "/v1/repos/tether/issues", &[]))
    };
    assert_eq!(send().expect("first connection").status, 200);
    assert_eq!(send().expect("resumed connection").status, 200);
    // And a keep-alive connection that stays open across the reload.
    let mut open = w.rt.block_on(client.connect()).expect("connect");
    let on_open = |open: &mut tether::client::Connection| {
        w.rt.block_on(open.send("GET", "/v1/repos/tether/issues"))
            .expect("response")
    };
    assert_eq!(on_open(&mut open).status, 200);

    // other.org's CA is replaced by another.
    let successor = Pki::new("other.org").expect("pki");
    std::fs::write(&bundle, successor.ca_pem()).expect("bundle");
    let (status, body) = w.rt.block_on(post_reload(w.sandbox.admin));
    assert_eq!(status, 200, "{body}");
    let r = on_open(&mut open);
    assert_eq!(
        r.status, 401,
        "the open connection no longer vouches: {r:?}"
    );
    assert_eq!(r.json().expect("json")["reason"], "no_identity");
    // Refused at the handshake is as good as refused in the request.
    if let Ok(r) = send() {
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.json().expect("json")["reason"], "no_identity");
    }
    let fresh = Client::new(
        w.sandbox.proxy,
        &w.sandbox.pki.ca_pem(),
        Some((&leaf.cert_pem, &leaf.key_pem)),
    )
    .expect("client");
    assert!(w
        .rt
        .block_on(fresh.send("GET", "/v1/repos/tether/issues", &[]))
        .is_err());
}

#[test]
fn the_watcher_follows_the_files_a_reloaded_config_names_and_restart_only_changes_are_refused() {
    let w = World::with(|c| c.reload.poll_interval_ms = 100);
    let (rt, sandbox) = (&w.rt, &w.sandbox);
    let decisions = Decisions::new(&w);
    let decide = || decisions.next();
    let rewrite = |change: &dyn Fn(&mut tether_config::Config)| {
        support::rewrite_config(sandbox, change);
    };

    // The config now names a policy file the process did not start with.
    let moved = sandbox.dir.path().join("moved.cedar");
    std::fs::write(&moved, version("b1")).expect("policies");
    rewrite(&|c| c.policy.policies = moved.clone());
    wait_for(&w, "tether_config_generation", 2.0);
    assert_eq!(decide(), "b1");
    // An edit to that file is a change the watcher sees.
    std::fs::write(&moved, version("b2")).expect("policies");
    let deadline = Instant::now() + Duration::from_secs(10);
    while decide() != "b2" {
        assert!(Instant::now() < deadline, "the edit was never loaded");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A section only a restart applies: the whole reload is refused,
    // loudly, rather than half applied. New policies and the restart-only
    // change arrive in one step (the policies in a file only the new
    // config names): written as two, a watcher poll between them would
    // rightly load the policies alone.
    let generation = w.metric("tether_config_generation");
    let next = sandbox.dir.path().join("next.cedar");
    std::fs::write(&next, version("c1")).expect("policies");
    rewrite(&|c| {
        c.policy.policies = next.clone();
        c.cache.max_entries += 1;
    });
    let (status, body) = rt.block_on(post_reload(sandbox.admin));
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("cache"), "{body}");
    assert_eq!(w.metric("tether_config_last_reload_successful"), 0.0);
    assert_eq!(w.metric("tether_config_generation"), generation);
    assert_eq!(decide(), "b2", "nothing of the refused version serves");
}

#[test]
fn a_reload_with_nothing_changed_reads_nothing() {
    // Whoever reaches the admin port (in egress mode, the agent itself)
    // cannot make Tether re-parse its policies and drop its decision
    // cache by asking.
    let w = World::with(|c| c.reload.watch = false);
    let post = || w.rt.block_on(post_reload(w.sandbox.admin));
    let (status, body) = post();
    assert_eq!(
        (status, &body["status"]),
        (200, &"unchanged".into()),
        "{body}"
    );
    assert_eq!(body["generation"], 1);
    let policies = w.sandbox.dir.path().join("policies").join("repos.cedar");
    std::fs::write(&policies, version("v2")).expect("write");
    let (status, body) = post();
    assert_eq!(
        (status, &body["status"]),
        (200, &"reloaded".into()),
        "{body}"
    );
    assert_eq!(body["generation"], 2);
    let (_, body) = post();
    assert_eq!(body["status"], "unchanged", "{body}");
    assert_eq!(w.metric("tether_config_generation"), 2.0);
    // A refused version is not parsed again either: asked again, the
    // same errors, and one failure counted.
    std::fs::write(&policies, "permit(principal, action,").expect("write");
    for _ in 0..3 {
        let (status, body) = post();
        assert_eq!(status, 422, "{body}");
        assert!(body.to_string().contains("repos.cedar"), "{body}");
    }
    assert_eq!(w.metric("tether_config_reload_failures_total"), 1.0);
}

#[test]
fn a_changed_upstream_ca_file_is_refused_until_a_restart() {
    // A CA dropped from an upstream's bundle (rotated, or compromised)
    // must not go on being trusted while a reload reports success.
    let outside = tempfile::tempdir().expect("dir");
    let ca = outside.path().join("upstream-ca.pem");
    let pki = |td: &str| tether_filters::identity::pki::Pki::new(td).expect("pki");
    std::fs::write(&ca, pki("first.example").ca_pem()).expect("write");
    let path = ca.clone();
    let w = World::with(move |c| {
        c.reload.watch = false;
        let api = c.upstream.take().expect("the example's upstream");
        let tls = tether_config::UpstreamTls {
            server_name: "other.example".into(),
            ca: Some(path),
            client_certificate: false,
            spiffe_id: None,
            trust_domain: None,
        };
        let other = tether_config::Upstream {
            name: Some("other".into()),
            hosts: Some(tether_config::OneOrMany::One("other.example".into())),
            tls: Some(tls),
            ..api.clone()
        };
        c.upstreams = vec![other, api];
    });
    std::fs::write(&ca, pki("second.example").ca_pem()).expect("write");
    let (status, body) = w.rt.block_on(post_reload(w.sandbox.admin));
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("tls.ca"), "{body}");
    assert_eq!(w.metric("tether_config_last_reload_successful"), 0.0);
}
