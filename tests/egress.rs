//! Egress mode end to end: the agent speaks plain HTTP to Tether on
//! loopback, the pod's own SVID is the principal, upstreams are chosen by
//! host or path prefix, and Tether originates mTLS with that SVID to an
//! upstream that checks it, through a rotation of the SVID under traffic.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{send_plain, World, TRIAGE};
use tether::client::Response;
use tether_config::{
    Config, JwksSource, JwtAlgorithm, Mode, OneOrMany, Route, TokenIssuer, TokenKind, Upstream,
    UpstreamTls, Workload,
};
use tether_filters::identity::pki::Pki;
use tether_testkit::mint::Minter;

const GITHUB: &str = "api.github.test";
const ISSUER: &str = "https://login.example.org";

/// The pod's side: its SVID files, the CA that issued them, and an mTLS
/// upstream that trusts that CA.
struct Pod {
    pki: Pki,
    dir: tempfile::TempDir,
    mtls_upstream: SocketAddr,
    /// Signs the delegation tokens agents pass along.
    issuer: Minter,
    /// Serves the mTLS upstream.
    _rt: tokio::runtime::Runtime,
}

impl Pod {
    fn cert(&self) -> PathBuf {
        self.dir.path().join("svid.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("svid-key.pem")
    }

    /// Writes a fresh SVID for `id`, certificate then key, as a rotation
    /// by an agent that is not atomic would; returns its thumbprint.
    fn issue_svid(&self, id: &str, pause: Duration) -> String {
        let leaf = self.pki.leaf(&[id]).expect("leaf");
        write_atomically(&self.cert(), &leaf.cert_pem);
        std::thread::sleep(pause);
        write_atomically(&self.key(), &leaf.key_pem);
        hex_sha256(leaf.der())
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn hex_sha256(der: &[u8]) -> String {
    tether_filters::identity::PeerIdentity::from_leaf_der(der)
        .expect("svid")
        .cert_sha256
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An egress Tether for a pod whose SVID is `TRIAGE`: `api.github.test`
/// goes to the mTLS upstream, `/v1/repos/` on any other host to the plain
/// echo; `/v2/status` has a route but no upstream.
fn egress() -> (World, Pod, String) {
    let pki = Pki::new("example.org").expect("pki");
    let dir = tempfile::tempdir().expect("dir");
    let rt = support::runtime();
    let server = pki
        .server(&["localhost", "127.0.0.1"])
        .expect("server cert");
    let mtls_upstream = rt
        .block_on(tether::echo::start_mtls(
            &server.cert_pem,
            &server.key_pem,
            &pki.ca_pem(),
        ))
        .expect("mTLS upstream");
    let pod = Pod {
        pki,
        dir,
        mtls_upstream,
        issuer: Minter::es256("k1").expect("key"),
        _rt: rt,
    };
    let first = pod.issue_svid(TRIAGE, Duration::ZERO);
    let ca = pod.dir.path().join("ca.pem");
    std::fs::write(&ca, pod.pki.ca_pem()).expect("ca");
    let jwks = pod.dir.path().join("jwks.json");
    std::fs::write(&jwks, Minter::jwks(&[&pod.issuer])).expect("jwks");
    let (cert, key, mtls) = (pod.cert(), pod.key(), pod.mtls_upstream);
    let w = World::with(move |c: &mut Config| {
        c.mode = Mode::Egress;
        c.listener.tls = None;
        c.workload = Some(Workload { cert, key });
        c.reload.poll_interval_ms = 100;
        c.tokens.issuers = vec![TokenIssuer {
            kind: TokenKind::Oidc,
            issuer: ISSUER.into(),
            audiences: vec!["tether".into()],
            jwks: JwksSource {
                file: Some(jwks),
                url: None,
                ca: None,
                refresh_seconds: 300,
                max_age_seconds: 3600,
                min_refetch_interval_ms: 1000,
            },
            algorithms: vec![JwtAlgorithm::ES256],
            agent_claim: "sub".into(),
            trust_domain: Some("example.org".into()),
            agent_prefix: None,
        }];
        let plain = c.upstream.take().expect("example upstream");
        c.upstreams = vec![
            Upstream {
                name: Some("github".into()),
                hosts: Some(OneOrMany::One(GITHUB.into())),
                path_prefix: None,
                address: mtls.to_string(),
                tls: Some(UpstreamTls {
                    server_name: "localhost".into(),
                    ca: Some(ca),
                    client_certificate: true,
                    spiffe_id: None,
                    trust_domain: None,
                }),
                encoded_slash: None,
            },
            Upstream {
                name: Some("local".into()),
                path_prefix: Some("/v1/repos/".into()),
                ..plain
            },
        ];
        let mut status: Route = c.routes[0].clone();
        status.method = OneOrMany::One("GET".into());
        status.path = "/v2/status".into();
        status.resource.id = "status".into();
        c.routes.push(status);
    });
    (w, pod, first)
}

fn get(w: &World, host: &str, path: &str) -> Response {
    w.rt.block_on(send_plain(w.sandbox.proxy, "GET", path, &[("host", host)]))
        .expect("response")
}

#[test]
fn the_pod_svid_is_the_principal_and_upstreams_are_chosen_by_host_or_prefix() {
    let (w, _pod, thumbprint) = egress();
    let r = get(&w, GITHUB, "/v1/repos/tether/issues");
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json().expect("echo");
    // The mTLS upstream saw Tether present the pod's SVID.
    assert_eq!(echo["client"]["spiffe_id"], TRIAGE);
    assert_eq!(echo["client"]["cert_sha256"], thumbprint.as_str());
    assert_eq!(echo["headers"]["x-tether-agent"], TRIAGE);

    let r = get(&w, "localhost", "/v1/repos/tether/issues");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.json().expect("echo")["client"].is_null(),
        "the plain upstream"
    );

    // Policy decides before anything leaves the pod.
    let r =
        w.rt.block_on(send_plain(
            w.sandbox.proxy,
            "DELETE",
            "/v1/repos/tether",
            &[("host", GITHUB)],
        ))
        .expect("response");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json().expect("json")["reason"], "policy_denied");

    // Allowed, but no upstream takes it: refused, nothing sent.
    let r = get(&w, "localhost", "/v2/status");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json().expect("json")["reason"], "no_route");
    let line = w.sandbox.audit_lines(4).pop().expect("line");
    assert_eq!(line["stage"], "upstream");

    let workload = w.metric("tether_certificate_expiry_seconds{certificate=\"workload\"}");
    assert!(workload > 0.0, "{workload}");
}

#[test]
fn the_svid_rotates_under_traffic_with_zero_failed_requests() {
    let (w, pod, old) = egress();
    let proxy = w.sandbox.proxy;
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = std::sync::Mutex::new(None::<String>);
    let results: Vec<Vec<(u16, String)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (rt, new) = (&w.rt, &new);
                s.spawn(move || {
                    let mut seen = Vec::new();
                    let mut after_rotation = 0;
                    // Until 20 requests after the new SVID was seen.
                    while after_rotation < 20 && Instant::now() < deadline {
                        let r = rt
                            .block_on(send_plain(
                                proxy,
                                "GET",
                                "/v1/repos/tether/issues",
                                &[("host", GITHUB)],
                            ))
                            .map(|r| {
                                let print = r.json().ok().and_then(|j| {
                                    j["client"]["cert_sha256"].as_str().map(String::from)
                                });
                                (r.status, print.unwrap_or_default())
                            })
                            .unwrap_or((0, String::new()));
                        if new.lock().expect("lock").as_deref() == Some(r.1.as_str()) {
                            after_rotation += 1;
                        }
                        seen.push(r);
                    }
                    seen
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // The key lands 250 ms after the certificate: polls in between
        // find a mismatched pair and keep the old one.
        let rotated = pod.issue_svid(TRIAGE, Duration::from_millis(250));
        *new.lock().expect("lock") = Some(rotated);
        workers
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    });
    let new = new.into_inner().expect("lock").expect("rotated");
    let all: Vec<&(u16, String)> = results.iter().flatten().collect();
    let failed: Vec<_> = all.iter().filter(|(status, _)| *status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        all.len()
    );
    let prints: HashSet<&str> = all.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        prints,
        HashSet::from([old.as_str(), new.as_str()]),
        "old, then new"
    );
    for worker in &results {
        assert_eq!(worker.last().map(|(_, p)| p.as_str()), Some(new.as_str()));
    }
}

#[test]
fn a_delegation_token_refines_the_pod_identity() {
    let (w, pod, _) = egress();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token = |actor: &str| {
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": "tether", "sub": "alice@example.org",
            "act": {"sub": actor}, "iat": now, "exp": now + 300,
        });
        format!("Bearer {}", pod.issuer.token(&claims))
    };
    let send = |auth: &str| {
        w.rt.block_on(send_plain(
            w.sandbox.proxy,
            "GET",
            "/v1/repos/tether/issues",
            &[("host", GITHUB), ("authorization", auth)],
        ))
        .expect("response")
    };
    // The agent acts for Alice: the pod's SVID is still the principal.
    let r = send(&token(TRIAGE));
    assert_eq!(r.status, 200, "{r:?}");
    let line = w.sandbox.audit_lines(1).pop().expect("line");
    assert_eq!(line["agent"], TRIAGE);
    assert_eq!(line["on_behalf_of"], "alice@example.org");
    assert_eq!(line["identity_kind"], "oidc");
    // A token for another agent cannot ride on this pod's SVID.
    let r = send(&token("spiffe://example.org/agents/other"));
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json().expect("json")["reason"], "token_not_bound");
}

#[test]
fn in_ingress_mode_a_workload_svid_is_shown_upstreams_never_taken_as_the_caller() {
    // An ingress sidecar may hold an SVID for upstreams that want mTLS;
    // it must never become the identity of a caller who has none.
    let pki = Pki::new("example.org").expect("pki");
    let dir = tempfile::tempdir().expect("dir");
    let leaf = pki.leaf(&[TRIAGE]).expect("leaf");
    let (cert, key) = (dir.path().join("svid.pem"), dir.path().join("svid-key.pem"));
    std::fs::write(&cert, &leaf.cert_pem).expect("cert");
    std::fs::write(&key, &leaf.key_pem).expect("key");
    let w = World::with(move |c: &mut Config| {
        c.workload = Some(Workload { cert, key });
        c.listener.client_auth = tether_config::ClientAuth::Optional;
    });
    let anonymous = w
        .send(None, "GET", "/v1/repos/tether/issues", &[])
        .expect("response");
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert_eq!(anonymous.json().expect("json")["reason"], "no_identity");
    let triage = w.get(TRIAGE, "/v1/repos/tether/issues");
    assert_eq!(triage.status, 200, "{triage:?}");
}

#[test]
fn an_upstream_authorized_by_spiffe_id_must_present_that_id() {
    // Two workloads of one trust domain, their SVIDs from the same CA and
    // both carrying the DNS name `localhost`: the API, and another one
    // (a compromised pod, a misrouted address) answering in its place.
    const API: &str = "spiffe://example.org/apis/github";
    let pki = Pki::new("example.org").expect("pki");
    let dir = tempfile::tempdir().expect("dir");
    let rt = support::runtime();
    let serve = |id: &str| {
        let svid = pki.server_svid(id, &["localhost"]).expect("svid");
        rt.block_on(tether::echo::start_mtls(
            &svid.cert_pem,
            &svid.key_pem,
            &pki.ca_pem(),
        ))
        .expect("upstream")
    };
    let (api, impostor) = (serve(API), serve("spiffe://example.org/agents/other"));
    let leaf = pki.leaf(&[TRIAGE]).expect("pod svid");
    let (cert, key, bundle) = (
        dir.path().join("svid.pem"),
        dir.path().join("svid-key.pem"),
        dir.path().join("bundle.pem"),
    );
    std::fs::write(&cert, &leaf.cert_pem).expect("write");
    std::fs::write(&key, &leaf.key_pem).expect("write");
    std::fs::write(&bundle, pki.ca_pem()).expect("write");
    let w = World::with(move |c: &mut Config| {
        c.mode = Mode::Egress;
        c.listener.tls = None;
        c.workload = Some(Workload { cert, key });
        c.trust_domains[0].bundle = bundle.clone();
        let upstream = |name: &str, address: SocketAddr, by_id: bool| Upstream {
            name: Some(name.into()),
            hosts: Some(OneOrMany::One(format!("{name}.test"))),
            path_prefix: None,
            address: address.to_string(),
            tls: Some(UpstreamTls {
                server_name: "localhost".into(),
                ca: (!by_id).then(|| bundle.clone()),
                client_certificate: true,
                spiffe_id: by_id.then(|| OneOrMany::One(API.into())),
                trust_domain: None,
            }),
            encoded_slash: None,
        };
        c.upstream = None;
        c.upstreams = vec![
            upstream("github", api, true),
            upstream("mirror", impostor, true),
            // As before `spiffe_id`: the bundle and the name only.
            upstream("by-name", impostor, false),
        ];
    });
    let r = get(&w, "github.test", "/v1/repos/tether/issues");
    assert_eq!(r.status, 200, "{r:?}");
    // The connection Tether made presented the pod's SVID.
    assert_eq!(r.json().expect("echo")["client"]["spiffe_id"], TRIAGE);

    let r = get(&w, "mirror.test", "/v1/repos/tether/issues");
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.json().expect("json")["reason"], "upstream_error");
    let line = w.sandbox.audit_lines(2).pop().expect("line");
    assert_eq!(line["reason"], "upstream_error", "{line}");
    assert_eq!(line["upstream"], "mirror", "{line}");
    let detail = line["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!(
            "upstream `mirror`: TLS handshake: presented `spiffe://example.org/agents/other`, \
             expected `{API}`"
        )),
        "{line}"
    );
    assert_eq!(
        w.metric("tether_upstream_cert_rejected_total{reason=\"spiffe_id\",upstream=\"mirror\"}"),
        1.0
    );

    // What the ID adds: by bundle and name alone, the impostor passes.
    let r = get(&w, "by-name.test", "/v1/repos/tether/issues");
    assert_eq!(r.status, 200, "{r:?}");
}
