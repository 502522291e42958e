//! Every shipped example stays valid, and the published JSON schema matches
//! the config types.

use std::path::{Path, PathBuf};
use std::process::Command;

use tether_config::Config;
use tether_filters::identity::pki::Pki;
use tether_filters::Snapshot;

const TETHER: &str = env!("CARGO_BIN_EXE_tether");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// A copy of `deploy/examples` with the certificates it names, which are
/// never committed, made for it.
fn example_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    copy_dir(&repo().join("deploy/examples"), dir.path());
    let pki = Pki::new("example.org").expect("pki");
    let server = pki.server(&["localhost"]).expect("server cert");
    let certs = dir.path().join("certs");
    std::fs::write(certs.join("server.pem"), &server.cert_pem).expect("write");
    std::fs::write(certs.join("server-key.pem"), &server.key_pem).expect("write");
    std::fs::write(certs.join("example.org.bundle.pem"), pki.ca_pem()).expect("write");
    dir
}

#[test]
fn the_example_config_loads_with_its_registry_schema_and_policies() {
    let dir = example_dir();
    let path = dir.path().join("tether.yaml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.registry.agents.len(), 4);
    let snapshot = Snapshot::load(&config, &path, 1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snapshot.routes.iter().count(), 5);
    assert_eq!(snapshot.policy.set.policies().count(), 7);

    let tether = |args: &[&str]| {
        let out = Command::new(TETHER)
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("tether runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    let (code, stdout, stderr) = tether(&["check"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("ok: 4 agents, 5 routes, 7 policies"),
        "{stdout}"
    );
    // Deletion is only ever forbidden: check says so, and nothing else.
    assert!(
        stdout.contains(
            "warning: routes[2]: no permit policy mentions action `Action::\"DeleteRepo\"`"
        ),
        "{stdout}"
    );
    assert_eq!(stdout.matches("warning").count(), 1, "{stdout}");

    // The example's expected decisions, as data: a table test of the
    // policies through the same chain the proxy runs.
    let cases = repo().join("deploy/examples/decisions.yaml");
    let cases_arg = cases.to_string_lossy().into_owned();
    let (code, stdout, stderr) = tether(&["explain", "--cases", &cases_arg]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("11 passed, 0 failed"), "{stdout}");

    // A wrong expectation fails, naming the case and the difference.
    let wrong = dir.path().join("wrong.yaml");
    let text = std::fs::read_to_string(&cases).expect("cases");
    std::fs::write(
        &wrong,
        text.replacen(
            "decision: allow, reason: allowed",
            "decision: deny, reason: allowed",
            1,
        ),
    )
    .expect("write");
    let wrong_arg = wrong.to_string_lossy().into_owned();
    let (code, stdout, _) = tether(&["explain", "--cases", &wrong_arg]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL  the triage bot reads issues: decision `allow`, expected `deny`"),
        "{stdout}"
    );

    // One request, explained.
    let (code, stdout, _) = tether(&[
        "explain",
        "--agent",
        "spiffe://example.org/agents/issue-triage",
        "--method",
        "DELETE",
        "--path",
        "/v1/repos/tether",
        "--at",
        "2026-12-01T12:00:00Z",
    ]);
    assert_eq!(code, Some(1), "denied exits 1: {stdout}");
    for expected in [
        "DENY  DELETE /v1/repos/tether  (policy_denied)",
        "owner      alice@example.org (team platform)",
        "action     Action::\"DeleteRepo\"",
        "policies   no-repo-deletion-by-agents",
        "refused by authorize: forbidden by no-repo-deletion-by-agents",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }

    // An MCP tool call, explained with its body.
    let (code, stdout, _) = tether(&[
        "explain",
        "--agent",
        "spiffe://example.org/agents/issue-triage",
        "--method",
        "POST",
        "--path",
        "/mcp",
        "--at",
        "2026-12-01T12:00:00Z",
        "--body",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"create_issue","arguments":{"repo":"private-x"}}}"#,
    ]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("policies   no-issues-in-private-repos"),
        "{stdout}"
    );
    assert!(
        stdout.contains("resource   Tool::\"create_issue\""),
        "{stdout}"
    );
}

/// `tether check --config CONFIG`: its exit status, stdout and stderr.
fn check(config: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(TETHER)
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("tether runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code(), format!("{stdout}{stderr}"))
}

#[test]
fn the_egress_example_loads_with_a_pod_svid() {
    let dir = tempfile::tempdir().expect("dir");
    copy_dir(&repo().join("deploy/examples"), dir.path());
    let pki = Pki::new("example.org").expect("pki");
    let svid = pki
        .leaf(&["spiffe://example.org/agents/issue-triage"])
        .expect("svid");
    let certs = dir.path().join("certs");
    std::fs::write(certs.join("svid.pem"), &svid.cert_pem).expect("write");
    std::fs::write(certs.join("svid-key.pem"), &svid.key_pem).expect("write");
    std::fs::write(certs.join("example.org.bundle.pem"), pki.ca_pem()).expect("write");
    let (code, stdout) = check(&dir.path().join("egress.yaml"));
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("1 token issuers"), "{stdout}");
    assert!(
        stdout.contains("route paths match case-sensitively (`paths.case: sensitive`)"),
        "check says how paths are matched: {stdout}"
    );
    assert!(!stdout.contains("SPIFFE bundle"), "{stdout}");
    assert!(!stdout.contains("chosen by host"), "{stdout}");
    // A route for any host, where an upstream is chosen by host: its
    // requests go wherever their `Host` says, and check says so.
    let egress = dir.path().join("egress.yaml");
    let text = std::fs::read_to_string(&egress).expect("egress.yaml");
    let any_host = dir.path().join("any-host.yaml");
    std::fs::write(
        &any_host,
        text.replacen("    host: repos.internal.example.org", "", 1),
    )
    .expect("write");
    let (code, stdout) = check(&any_host);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("warning: routes[0]: `/v1/repos/{repo}/issues` matches any host, and upstream `repos` is chosen by host"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("chosen by host").count(), 1, "{stdout}");
    // An upstream verified by the domain's bundle and a DNS name alone:
    // any workload of the domain with that name in its SVID would pass.
    let by_id = "spiffe_id: spiffe://example.org/ns/repos/sa/api";
    assert!(text.contains(by_id));
    let by_name = dir.path().join("by-name.yaml");
    std::fs::write(
        &by_name,
        text.replacen(by_id, "ca: certs/example.org.bundle.pem", 1),
    )
    .expect("write");
    let (code, stdout) = check(&by_name);
    assert_eq!(code, Some(0), "a warning, not an error: {stdout}");
    assert!(
        stdout.contains(
            "warning: upstreams[1].tls.ca: the SPIFFE bundle of `example.org`, with no \
             `spiffe_id`: any workload of `example.org` whose SVID carries the name \
             `repos.internal.example.org` passes for the upstream"
        ),
        "{stdout}"
    );
    // So does a bundle `trust_domains` does not list: its CA names the
    // trust domain in its URI SAN.
    let listed = "trust_domains:                      # verifies upstreams' SVIDs (below)\n  \
                  - name: example.org\n    bundle: certs/example.org.bundle.pem\n";
    assert!(text.contains(listed));
    std::fs::write(
        &by_name,
        text.replacen(listed, "", 1)
            .replacen(by_id, "ca: certs/example.org.bundle.pem", 1),
    )
    .expect("write");
    let (code, stdout) = check(&by_name);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("warning: upstreams[1].tls.ca: the SPIFFE bundle of `example.org`"),
        "{stdout}"
    );
    // What `run` would refuse, `check` refuses too: an upstream CA that
    // holds no certificate, an audit log in a folder that is not there.
    std::fs::write(certs.join("garbage.pem"), "garbage").expect("write");
    for (from, to, expected) in [
        (by_id, "ca: certs/garbage.pem", "tls.ca"),
        (
            "  output: stdout",
            "  output: /nonexistent-folder/audit.log",
            "audit.output",
        ),
    ] {
        let broken = dir.path().join("broken.yaml");
        assert!(text.contains(from), "{from}");
        std::fs::write(&broken, text.replacen(from, to, 1)).expect("write");
        let (code, stdout) = check(&broken);
        assert_eq!(code, Some(1), "{to}: {stdout}");
        assert!(stdout.contains(expected), "{to}: {stdout}");
    }
    // Its routes name their host: explained with it, as the proxy sees
    // the request, and without it, where no route matches.
    let explain = |host: Option<&str>| {
        let mut args = vec![
            "explain".to_string(),
            "--config".into(),
            egress.to_string_lossy().into_owned(),
            "--agent".into(),
            "spiffe://example.org/agents/issue-triage".into(),
            "--path".into(),
            "/v1/repos/tether/issues".into(),
        ];
        if let Some(host) = host {
            args.extend(["--host".into(), host.into()]);
        }
        let out = Command::new(TETHER)
            .args(&args)
            .output()
            .expect("tether runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stdout) = explain(Some("repos.internal.example.org:443"));
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("ALLOW  GET /v1/repos/tether/issues"),
        "{stdout}"
    );
    let (code, stdout) = explain(None);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("(no_route)"), "{stdout}");
    // The example's policies with the pod's SVID as the principal.
    let config = Config::load(&dir.path().join("egress.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.mode, tether_config::Mode::Egress);
    assert_eq!(config.upstreams.len(), 2);
}

/// `tether check | head` and the like: a reader that has gone is no
/// reason to panic (Rust's `println!` does on a closed pipe).
#[test]
fn a_reader_that_closed_the_pipe_gets_a_quiet_exit_not_a_panic() {
    let dir = example_dir();
    let config = dir.path().join("tether.yaml");
    for args in [
        vec!["schema"],
        vec!["check", "--config", config.to_str().expect("utf-8")],
    ] {
        // The reading end is closed before the child starts: its first
        // write fails with EPIPE, every time.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(TETHER)
            .args(&args)
            .stdout(writer)
            .output()
            .expect("tether runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

#[test]
fn the_committed_json_schema_matches_the_config_types() {
    let committed = std::fs::read_to_string(repo().join("deploy/config.schema.json"))
        .expect("deploy/config.schema.json");
    assert!(
        committed == Config::json_schema(),
        "deploy/config.schema.json is stale: run `cargo run -q -p tether -- schema > deploy/config.schema.json`"
    );
}

#[test]
fn check_warns_about_an_admin_listener_beyond_loopback() {
    let dir = example_dir();
    let config = dir.path().join("tether.yaml");
    let text = std::fs::read_to_string(&config).expect("tether.yaml");
    std::fs::write(
        &config,
        text.replace("address: 127.0.0.1:9901", "address: 0.0.0.0:9901"),
    )
    .expect("write");
    let (code, stdout) = check(&config);
    assert_eq!(code, Some(0), "a warning, not an error: {stdout}");
    assert!(
        stdout.contains("warning: admin.address: `0.0.0.0:9901` is reachable beyond this host"),
        "{stdout}"
    );
}
