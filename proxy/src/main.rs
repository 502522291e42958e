//! The `tether` command line.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tether: an access proxy that verifies workload identity, requires a
/// human owner for every agent, and checks every request against Cedar.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the config, registry, Cedar schema and policies, and exit.
    Check {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Decide a described request offline and show why; or, with
    /// `--cases`, check a file of requests against expected decisions.
    /// Exits 0 if allowed (all cases matched), 1 if not.
    Explain {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// A YAML file of cases: `cases: [{name, agent, method, path, expect: {decision, reason, policies}}]`.
        #[arg(long, conflicts_with_all = ["agent", "path"])]
        cases: Option<PathBuf>,
        /// The caller's SPIFFE ID.
        #[arg(long, required_unless_present = "cases")]
        agent: Option<String>,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request path.
        #[arg(long, required_unless_present = "cases")]
        path: Option<String>,
        /// The `Host` the request names (routes with `host:` need one).
        #[arg(long)]
        host: Option<String>,
        /// The caller's IP address.
        #[arg(long)]
        source_ip: Option<std::net::IpAddr>,
        /// When the request is made, RFC 3339 (default: now).
        #[arg(long)]
        at: Option<String>,
        /// The request body (an MCP JSON-RPC call, on MCP routes).
        #[arg(long)]
        body: Option<String>,
        /// Print the full record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the whole story on this machine, with no setup.
    Demo,
    /// Print the JSON schema of the config file.
    Schema,
}

/// mimalloc: cheaper than the system allocator for the proxy's many small,
/// short-lived per-request allocations (see loadtest/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // A release build aborts on a panic (`panic = "abort"`): the proxy
    // stops for every agent. Every build does the same, so that a test
    // build, which unwinds, cannot hide a panic that input reaches behind
    // one dropped task: the integration tests see the process die.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    // One crypto stack for every TLS client in the process (the OTLP HTTP
    // exporter's reqwest among them): ring, as rustls uses everywhere else.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => tether::server::run(&config).map(|()| true),
        Command::Check { config } => {
            // Buffered: a large policy set can have thousands of warnings,
            // and stdout would otherwise write each line on its own.
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            tether::check::run(&config, &mut out).and_then(|ok| Ok(out.flush().map(|()| ok)?))
        }
        Command::Explain {
            config,
            cases: Some(cases),
            ..
        } => tether::explain::run_cases(&config, &cases),
        Command::Explain {
            config,
            cases: None,
            agent,
            method,
            path,
            host,
            source_ip,
            at,
            body,
            json,
        } => {
            let query = tether::explain::Query {
                name: String::new(),
                agent: agent.unwrap_or_default(),
                method,
                path: path.unwrap_or_default(),
                host,
                source_ip,
                at,
                body,
                expect: None,
            };
            tether::explain::run(&config, &query, json)
        }
        Command::Demo => tether::demo::run(),
        Command::Schema => {
            let schema = tether_config::Config::json_schema();
            std::io::stdout()
                .write_all(schema.as_bytes())
                .map(|()| true)
                .map_err(Into::into)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // The reader went away (`tether check | head`): nothing left to
        // say to it, and nothing to say about it.
        Err(e) if is_broken_pipe(&e) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}
