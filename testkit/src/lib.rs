//! Fixtures for Tether's tests and benches, kept out of the crates the
//! `tether` binary is built from: a throwaway token issuer ([`mint`]) that
//! also forges the tokens an attacker sends, so tests prove they are
//! refused.
//!
//! A dev-dependency only. `.ci/run` fails when this crate shows up among the
//! binary's normal dependencies.

pub mod mint;
