//! The `wsgate` command line: parse arguments, set up logging, call the
//! library, map the result to an exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use wsgate::{Config, Proxy};

/// mimalloc hands freed pages back to the OS: handshakes allocate and free a
/// lot, and with glibc's allocator that memory stays resident under tens of
/// thousands of idle tunnels (measured in benches/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "wsgate", version, about = "A WebSocket-aware reverse proxy")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the config until SIGINT/SIGTERM; SIGHUP reloads it.
    Run(RunArgs),
    /// Validate the config like `nginx -t`: print `config ok` or every problem.
    Check(ConfigArg),
    /// Echo backend + proxy with TLS + a scripted run through it, in one process.
    Demo,
    /// Load-test WebSocket upgrade passthrough.
    Load(wsgate::tools::load::LoadArgs),
    /// Diagnose a WebSocket endpoint, wsgate or not: each step, a verdict and the likely fix.
    Probe(wsgate::tools::probe::ProbeArgs),
    /// Write a self-signed development certificate and key (ECDSA P-256).
    Cert(CertArgs),
    /// Run a WebSocket echo backend (for trying wsgate out and for benchmarks).
    Echo {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
    },
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file.
    #[arg(short = 'c', long = "config", default_value = "proxy.toml")]
    config: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// `text` (colour only on a terminal) or `json`: one object a line with
    /// timestamp, level, message and every field.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct CertArgs {
    /// Folder to write NAME.crt and NAME.key into.
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// File name stem.
    #[arg(long, default_value = "localhost")]
    name: String,
    /// DNS names / IP addresses the certificate is for.
    #[arg(default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()])]
    hosts: Vec<String>,
}

/// Logs go to stderr; colour codes only when it is a terminal, so log files
/// and journald get plain text.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run(RunArgs {
        config: ConfigArg {
            config: PathBuf::from("proxy.toml"),
        },
        log_format: LogFormat::Text,
    }));
    let log_format = match &command {
        Command::Run(args) => args.log_format,
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    // `run` loads its config before the runtime exists: `[server]
    // worker_threads` decides which runtime to build.
    let config = match &command {
        Command::Run(args) => match Config::load(&args.config.config) {
            Ok(config) => Some(config),
            Err(errors) => {
                eprintln!("wsgate: {errors}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let threads = config
        .as_ref()
        .and_then(|config| config.server.worker_threads);
    let runtime = match build_runtime(threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wsgate: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Run(args) => match config {
                Some(config) => serve(&args.config.config, config)
                    .await
                    .map(|()| ExitCode::SUCCESS),
                None => unreachable!("`run` loaded its config above"),
            },
            Command::Check(args) => Ok(check(&args.config)),
            Command::Demo => wsgate::tools::demo::run().await.map(|passed| {
                if passed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }),
            Command::Load(args) => wsgate::tools::load::run(args).await,
            Command::Probe(args) => wsgate::tools::probe::run(args).await,
            Command::Cert(args) => write_certificate(&args).map(|()| ExitCode::SUCCESS),
            Command::Echo { listen } => {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                eprintln!("echo backend listening on ws://{}", listener.local_addr()?);
                wsgate::tools::echo::serve(listener).await;
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("wsgate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// One thread is the current-thread runtime; otherwise a multi-thread one,
/// by default one worker per CPU.
fn build_runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(count) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(count)
            .enable_all()
            .build(),
        None => tokio::runtime::Runtime::new(),
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for warning in config.warnings() {
                println!("warning: {warning}");
            }
            println!("config ok");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            println!("{errors}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: &Path, config: Config) -> anyhow::Result<()> {
    for warning in config.warnings() {
        tracing::warn!(%warning, "config");
    }
    // Before the first "listening" line: a SIGHUP or SIGTERM sent as soon as
    // that line appears must find its handler, not the default action that
    // ends the process. One that arrives before serving starts waits in its
    // stream.
    let mut hangups = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let proxy = Proxy::bind(&config).await?;
    for addr in proxy.local_addrs() {
        tracing::info!(%addr, "listening");
    }
    if let Some(addr) = proxy.admin_addr() {
        tracing::info!(%addr, "admin endpoints /metrics, /healthz and /readyz up");
    }
    let reloader = proxy.reloader();
    let config_path = path.to_path_buf();
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            // A bad new config must never take the running one down.
            if let Err(error) = reloader.reload_from(&config_path) {
                tracing::error!(%error, "reload refused; the previous configuration keeps serving");
            }
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };
    proxy.serve(shutdown).await
}

fn write_certificate(args: &CertArgs) -> anyhow::Result<()> {
    let (cert, key) = wsgate::tls::generate_dev_certificate(&args.hosts)?;
    std::fs::create_dir_all(&args.out)?;
    let cert_path = args.out.join(format!("{}.crt", args.name));
    let key_path = args.out.join(format!("{}.key", args.name));
    std::fs::write(&cert_path, cert)?;
    write_private(&key_path, key.as_bytes())?;
    println!(
        "wrote {} and {} for {}",
        cert_path.display(),
        key_path.display(),
        args.hosts.join(", ")
    );
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}
