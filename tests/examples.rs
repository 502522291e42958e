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

#[test]
fn the_example_config_loads_with_its_registry_schema_and_policies() {
    let dir = tempfile::tempdir().expect("dir");
    copy_dir(&repo().join("deploy/examples"), dir.path());
    // Certificates are never committed: make the ones the example names.
    let pki = Pki::new("example.org").expect("pki");
    let server = pki.server(&["localhost"]).expect("server cert");
    let certs = dir.path().join("certs");
    std::fs::write(certs.join("server.pem"), &server.cert_pem).expect("write");
    std::fs::write(certs.join("server-key.pem"), &server.key_pem).expect("write");
    std::fs::write(certs.join("example.org.bundle.pem"), pki.ca_pem()).expect("write");

    let path = dir.path().join("tether.yaml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.registry.agents.len(), 4);
    let snapshot = Snapshot::load(&config, &path, 1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snapshot.routes.iter().count(), 4);
    assert_eq!(snapshot.policy.set.policies().count(), 3);

    let out = Command::new(TETHER)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 4 agents, 4 routes, 3 policies"));
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
