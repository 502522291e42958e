use std::path::Path;

use super::*;

const MINIMAL: &str = "\
listener:
  address: 127.0.0.1:8443
  tls: {cert: server.pem, key: server-key.pem}
trust_domains:
  - {name: example.org, bundle: bundle.pem}
upstream:
  address: 127.0.0.1:8080
registry:
  agents:
    - id: spiffe://example.org/agents/triage
      owner: alice@example.com
      expires: 2027-06-30
policy:
  schema: tether.cedarschema
  policies: policies
routes:
  - method: GET
    path: /v1/repos/{repo}/issues
    action: ListIssues
    resource: {type: Repo, id: '{repo}'}
";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(text, Path::new("tether.yaml"))
}

#[test]
fn a_minimal_config_parses_with_defaults_filled_in() {
    let c = parse(MINIMAL).expect("minimal config");
    assert_eq!(c.admin.address, "127.0.0.1:9901");
    assert_eq!(c.cache.max_entries, 100_000);
    assert_eq!(c.server.threads, 1);
    assert_eq!(c.audit.output, "stdout");
    assert!(c.telemetry.otlp.is_none());
    assert_eq!(c.registry.agents[0].state, AgentState::Active);
}

#[test]
fn an_unknown_field_is_refused_with_its_path_and_position() {
    let text = MINIMAL.replace(
        "    action: ListIssues\n",
        "    action: ListIssues\n    acton: Typo\n",
    );
    let e = parse(&text).expect_err("unknown field");
    assert_eq!(e.field, "routes[0]");
    assert!(e.message.contains("unknown field `acton`"), "{}", e.message);
    assert_eq!(e.position.map(|p| p.0), Some(20));
    assert!(e.to_string().starts_with("tether.yaml:20:"), "{e}");
}

#[test]
fn a_wrong_type_names_the_field() {
    let text = MINIMAL.replace("ttl", "").replace(
        "upstream:\n  address: 127.0.0.1:8080\n",
        "upstream:\n  address: 127.0.0.1:8080\ncache: {max_entries: lots}\n",
    );
    let e = parse(&text).expect_err("bad type");
    assert_eq!(e.field, "cache.max_entries");
}

#[test]
fn a_null_owner_is_no_owner() {
    // YAML would read `~` into a String as the text "~".
    for null in ["~", "null", "Null"] {
        let text = MINIMAL.replace("owner: alice@example.com", &format!("owner: {null}"));
        let e = parse(&text).expect_err("a null owner");
        assert!(e.field.starts_with("registry.agents[0]"), "{null}: {e}");
        assert!(e.message.contains("`owner` is null"), "{e}");
    }
    let text = MINIMAL.replace("owner: alice@example.com", "owner: '~'");
    assert!(
        parse(&text).is_ok(),
        "a quoted `~` is a string someone wrote"
    );
}

#[test]
fn validation_reports_every_problem_with_its_path() {
    let text = MINIMAL
        .replace("address: 127.0.0.1:8080", "address: localhost")
        .replace("owner: alice@example.com", "owner: '  '")
        .replace("id: '{repo}'", "id: '{owner}'")
        .replace("method: GET", "method: get");
    let c = parse(&text).expect("parses");
    let errors = c.validate();
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    for expected in [
        "upstream.address",
        "registry.agents[0].owner",
        "routes[0].resource.id",
        "routes[0].method",
        // files are relative to a folder that does not hold them
        "listener.tls.cert",
        "policy.schema",
    ] {
        assert!(
            fields.contains(&expected),
            "{expected} missing from {fields:?}"
        );
    }
}

#[test]
fn agents_outside_the_trust_domains_are_refused() {
    let text = MINIMAL.replace(
        "spiffe://example.org/agents/triage",
        "spiffe://other.org/agents/triage",
    );
    let errors = parse(&text).expect("parses").validate();
    let e = errors
        .iter()
        .find(|e| e.field == "registry.agents[0].id")
        .expect("agent id error");
    assert!(e.message.contains("`other.org`"), "{}", e.message);
}

#[test]
fn load_locates_validation_errors_in_the_file() {
    let dir = tempdir();
    let path = dir.join("tether.yaml");
    std::fs::write(
        &path,
        MINIMAL.replace("address: 127.0.0.1:8080", "address: localhost"),
    )
    .expect("write");
    let errors = Config::load(&path).expect_err("invalid").0;
    let e = errors
        .iter()
        .find(|e| e.field == "upstream.address")
        .expect("upstream error");
    assert_eq!(e.file, path);
    assert_eq!(e.position, Some((7, 12)));
}

#[test]
fn relative_paths_resolve_against_the_config_folder() {
    let mut c = parse(MINIMAL).expect("parses");
    c.resolve_paths(Path::new("/etc/tether"));
    assert_eq!(
        c.listener.tls.as_ref().map(|t| t.cert.as_path()),
        Some(Path::new("/etc/tether/server.pem"))
    );
    assert_eq!(c.policy.policies, Path::new("/etc/tether/policies"));
    assert_eq!(c.audit.output, "stdout");
}

#[test]
fn template_params_are_whole_names() {
    assert_eq!(
        template_params("/v1/{owner}/{repo:int}").expect("valid"),
        vec![
            ("owner".to_string(), ParamType::Str),
            ("repo".to_string(), ParamType::Int)
        ]
    );
    assert!(template_params("/v1/{a:float}").is_err());
    assert!(ParamType::Uuid.accepts("123e4567-e89b-12d3-a456-426614174000"));
    assert!(!ParamType::Uuid.accepts("123e4567-e89b-12d3-a456"));
    assert!(ParamType::Int.accepts("42") && !ParamType::Int.accepts("4x"));
    assert!(template_params("v1/x").is_err());
    assert!(template_params("/v1/{a").is_err());
    assert!(template_params("/v1/{a}/{a}").is_err());
    assert!(template_params("/v1/{a-b}").is_err());
}

#[test]
fn a_path_parameter_is_a_whole_segment() {
    assert_eq!(
        path_params("/v1/{owner}/x/{n:int}").expect("valid").len(),
        2
    );
    for template in [
        "/v1/compare/{base}...{head}",
        "/v1/{a}{b}",
        "/v1/x{a}",
        "/v1/{a}.json",
        "/v1/{a}}",
    ] {
        let e = path_params(template).expect_err(template);
        assert!(e.contains(template), "{e}");
    }
    // A resource id template may put parameters anywhere.
    assert_eq!(template_params("/{base}...{head}").expect("valid").len(), 2);
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tether-config-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn an_egress_listener_binds_to_loopback_tls_or_not() {
    // Whoever reaches an egress listener speaks as the pod's own SVID.
    for listener in [
        "listener:\n  address: 0.0.0.0:15001\n",
        "listener:\n  address: 0.0.0.0:15001\n  tls: {cert: server.pem, key: server-key.pem}\n",
    ] {
        let text = MINIMAL.replacen(
            "listener:\n  address: 127.0.0.1:8443\n  tls: {cert: server.pem, key: server-key.pem}\n",
            &format!("mode: egress\nworkload: {{cert: svid.pem, key: svid-key.pem}}\n{listener}"),
            1,
        );
        assert!(text.contains("mode: egress"), "the listener was replaced");
        let errors = parse(&text).expect("parses").validate();
        let e = errors
            .iter()
            .find(|e| e.field == "listener.address")
            .unwrap_or_else(|| panic!("no listener error for {listener:?}: {errors:?}"));
        assert!(e.message.contains("loopback"), "{}", e.message);
    }
}

#[test]
fn an_unknown_kid_cannot_make_tether_fetch_keys_on_every_request() {
    let text = MINIMAL.replace(
        "policy:\n",
        "tokens:\n  issuers:\n    - kind: jwt_svid\n      issuer: https://spire.example.org\n      \
         audiences: [tether]\n      trust_domain: example.org\n      \
         jwks: {url: 'https://spire.example.org/keys', min_refetch_interval_ms: 0}\npolicy:\n",
    );
    let errors = parse(&text).expect("parses").validate();
    assert!(
        errors
            .iter()
            .any(|e| e.field == "tokens.issuers[0].jwks.min_refetch_interval_ms"),
        "{errors:?}"
    );
}

#[test]
fn an_oidc_issuer_is_held_to_one_trust_domain() {
    let with_issuer = |fields: &str| {
        let text = MINIMAL.replace(
            "policy:\n",
            &format!(
                "tokens:\n  issuers:\n    - kind: oidc\n      issuer: https://login.partner.example\n      \
                 audiences: [tether]\n      jwks: {{url: 'https://login.partner.example/keys'}}\n{fields}policy:\n"
            ),
        );
        parse(&text).expect("parses").validate()
    };
    // Neither: a partner's IdP could name an agent of any trust domain.
    let errors = with_issuer("");
    assert!(
        errors
            .iter()
            .any(|e| e.field == "tokens.issuers[0].trust_domain" && e.message.contains("missing")),
        "{errors:?}"
    );
    // A prefix outside the trust domain would map every subject to a refusal.
    let errors = with_issuer(
        "      trust_domain: example.org\n      agent_prefix: spiffe://partner.example/oidc/\n",
    );
    assert!(
        errors
            .iter()
            .any(|e| e.field == "tokens.issuers[0].agent_prefix"),
        "{errors:?}"
    );
    for fields in [
        "      trust_domain: example.org\n",
        "      agent_prefix: spiffe://example.org/oidc/\n",
        "      trust_domain: example.org\n      agent_prefix: spiffe://example.org/oidc/\n",
    ] {
        let errors = with_issuer(fields);
        assert!(
            !errors.iter().any(|e| e.field.starts_with("tokens")),
            "{fields}: {errors:?}"
        );
    }
}

#[test]
fn routes_that_would_mean_less_than_they_say_are_refused() {
    // A key written twice: YAML would keep the last, silently.
    let text = MINIMAL.replace(
        "resource: {type: Repo, id: '{repo}'}",
        "resource: {type: Repo, id: '{repo}', attributes: {public: 'yes', public: 'no'}}",
    );
    let e = parse(&text).expect_err("a duplicate attribute");
    assert!(e.message.contains("`public` appears twice"), "{e}");
    for (from, to, field) in [
        // A host list of none: a route that matches nothing.
        (
            "    path: /v1/repos/{repo}/issues\n",
            "    host: []\n    path: /v1/repos/{repo}/issues\n",
            "routes[0].host",
        ),
        (
            "  address: 127.0.0.1:8080\n",
            "  address: 127.0.0.1:8080\n  hosts: []\n",
            "upstream.hosts",
        ),
        // An MCP route's actions are its methods: this one would be ignored.
        (
            "    path: /v1/repos/{repo}/issues\n",
            "    path: /v1/repos/{repo}/issues\n    mcp: {tool_type: Tool}\n",
            "routes[0].action",
        ),
    ] {
        let text = MINIMAL.replace(from, to);
        assert_ne!(text, MINIMAL, "{to}");
        let errors = parse(&text).expect("parses").validate();
        assert!(
            errors.iter().any(|e| e.field == field),
            "{field}: {errors:?}"
        );
    }
}

#[test]
fn an_upstream_authorized_by_spiffe_id_names_ids_of_a_listed_trust_domain() {
    let tls_errors = |tls: &str| {
        let text = MINIMAL.replace(
            "upstream:\n  address: 127.0.0.1:8080\n",
            &format!("upstream:\n  address: 127.0.0.1:8080\n  tls: {tls}\n"),
        );
        assert!(text.contains(tls), "the upstream was replaced");
        parse(&text)
            .expect("parses")
            .validate()
            .into_iter()
            .filter(|e| e.field.starts_with("upstream.tls"))
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
    };
    for good in [
        "{server_name: api, spiffe_id: spiffe://example.org/api}",
        "{server_name: api, spiffe_id: [spiffe://example.org/a, spiffe://example.org/b]}",
        "{server_name: api, trust_domain: example.org}",
    ] {
        assert_eq!(tls_errors(good), Vec::<String>::new(), "{good}");
    }
    for (bad, expected) in [
        (
            "{server_name: api, spiffe_id: spiffe://other.org/api}",
            "upstream.tls: trust domain `other.org` is not in `trust_domains`",
        ),
        (
            "{server_name: api, trust_domain: other.org}",
            "upstream.tls: trust domain `other.org` is not in `trust_domains`",
        ),
        (
            "{server_name: api, spiffe_id: 'spiffe://example.org'}",
            "upstream.tls.spiffe_id: `spiffe://example.org` names a trust domain",
        ),
        (
            "{server_name: api, spiffe_id: []}",
            "upstream.tls.spiffe_id: names no ID",
        ),
        (
            "{server_name: api, spiffe_id: spiffe://example.org/api, trust_domain: example.org}",
            "upstream.tls.trust_domain: not with `spiffe_id`",
        ),
        (
            "{server_name: api, spiffe_id: spiffe://example.org/api, ca: bundle.pem}",
            "upstream.tls.ca: not with `spiffe_id` or `trust_domain`",
        ),
    ] {
        let errors = tls_errors(bad);
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "{bad}: {errors:?}"
        );
    }
}

#[test]
fn encoded_slash_is_rejected_by_default_and_an_upstream_may_only_be_stricter() {
    let c = parse(MINIMAL).expect("minimal config");
    assert_eq!(c.paths.encoded_slash, EncodedSlash::Reject);
    let with = |paths: &str, upstream: &str| {
        let text = MINIMAL.replace(
            "upstream:\n  address: 127.0.0.1:8080\n",
            &format!("paths: {{encoded_slash: {paths}}}\nupstream:\n  address: 127.0.0.1:8080\n  encoded_slash: {upstream}\n"),
        );
        let c = parse(&text).expect("parses");
        c.validate()
            .into_iter()
            .filter(|e| e.field == "upstream.encoded_slash")
            .map(|e| e.message)
            .collect::<Vec<_>>()
    };
    assert!(with("keep", "reject").is_empty());
    assert!(with("decode", "reject").is_empty());
    assert!(with("keep", "keep").is_empty());
    let refused = with("keep", "decode");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("only `reject`"), "{refused:?}");
    assert_eq!(with("reject", "keep").len(), 1);
    let e = parse(&MINIMAL.replace("routes:", "paths: {encoded_slash: maybe}\nroutes:"))
        .expect_err("unknown value");
    assert_eq!(e.field, "paths.encoded_slash");
}
