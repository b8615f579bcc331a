//! The `persona` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use persona::config::{ClockMode, Config, Settings};
use std::io::Write;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "persona",
    version,
    about = "Real-time user profiles on differential dataflow"
)]
struct Cli {
    /// With no command, `persona` runs the engine with the default config (`persona run`).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args, Default)]
struct RunArgs {
    /// TOML config file (default: the embedded config/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Worker threads (overrides engine.workers).
    #[arg(long)]
    workers: Option<usize>,
    /// This process's index in the cluster of `[cluster]` (0 with no cluster).
    #[arg(long, default_value_t = 0)]
    process: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine and the HTTP server (default config: follow the bundled sample log).
    Run(RunArgs),
    /// Replay a log as fast as possible and write the final profiles.
    Replay {
        /// Event log, JSON Lines (.gz accepted).
        #[arg(long)]
        events: PathBuf,
        /// Item catalog, JSON Lines.
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Write one profile per line, sorted by user_id (`-` for standard output).
        #[arg(long)]
        dump: Option<PathBuf>,
        /// Dead-letter file (default: source.dead_letter_path of the config).
        #[arg(long)]
        dead_letters: Option<PathBuf>,
        /// Write every segment entry and exit, in time order per user (JSON Lines). Each line
        /// then enters at the clock as it stands once it is read, which costs some speed.
        #[arg(long)]
        triggers: Option<PathBuf>,
        /// TOML config file (default: the embedded config/default.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Worker threads (overrides engine.workers).
        #[arg(long)]
        workers: Option<usize>,
        /// This process's index in the cluster of `[cluster]`; each process replays its share
        /// of the log and dumps the users its workers own.
        #[arg(long, default_value_t = 0)]
        process: usize,
        /// Keep the HTTP server up on the final state.
        #[arg(long)]
        serve: bool,
    },
    /// Score the recommendation strategies on a log split in time (precision, recall, NDCG).
    Evaluate {
        #[command(flatten)]
        args: persona::evaluate::EvaluateArgs,
        /// TOML config file (default: the embedded config/default.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Worker threads (overrides engine.workers).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Read and validate a log without keeping state: counts of valid lines and of each
    /// rejection reason (what a replay would send to dead letters, less the clock checks).
    Validate(persona::validate::ValidateArgs),
    /// Write a synthetic event log (and catalog) for benchmarks.
    Generate(persona::generate::Options),
    /// Send a log's lines to a Kafka topic, keyed and partitioned by user_id.
    Produce(persona::kafka_tools::ProduceArgs),
    /// Copy what a Kafka topic holds now to a log file.
    Record(persona::kafka_tools::RecordArgs),
}

/// The settings of `config` (with `--workers`), for `process` of its cluster if it has one;
/// `process: None` ignores `[cluster]` (single-process commands).
fn settings(
    config: Option<PathBuf>,
    workers: Option<usize>,
    process: Option<usize>,
    print: bool,
    command: impl FnOnce(&mut Config),
) -> Result<Settings> {
    let mut config = Config::load(config.as_deref(), std::env::vars())?;
    // What the command sets itself, so that the printed configuration is the one it runs.
    command(&mut config);
    let clustered = process.is_some() && !config.cluster.addresses.is_empty();
    if let (Some(w), false) = (workers, clustered) {
        config.engine.workers = w;
    }
    if print {
        // Not eprintln!: a closed stderr is no reason to fail.
        let _ = writeln!(
            std::io::stderr(),
            "# effective configuration\n{}",
            config.to_toml()
        );
    } else {
        // A batch command's output stays its summary; RUST_LOG=debug shows what it ran with.
        tracing::debug!("effective configuration\n{}", config.to_toml());
    }
    let settings = Settings::from_config(&config)?;
    persona::affinity::check("engine.worker_cpus", &settings.worker_cpus)?;
    persona::affinity::check("http.cpus", &settings.http.cpus)?;
    match process {
        Some(p) => settings.for_process(&config.cluster, p, workers),
        None => Ok(settings),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A closed stderr must not panic the thread that logs (it would report with eprintln!).
        .log_internal_errors(false)
        .init();
    match Cli::parse()
        .command
        .unwrap_or(Command::Run(RunArgs::default()))
    {
        Command::Run(RunArgs {
            config,
            workers,
            process,
        }) => persona::run::command(settings(config, workers, Some(process), true, |_| {})?),
        Command::Replay {
            events,
            catalog,
            dump,
            dead_letters,
            triggers,
            config,
            workers,
            process,
            serve,
        } => {
            // A replay that stays up to serve prints it as `run` does.
            let s = settings(config, workers, Some(process), serve, |c| {
                c.engine.clock = ClockMode::Event;
                if let Some(d) = &dead_letters {
                    c.source.dead_letter_path.clone_from(d);
                }
            })?;
            persona::replay::command(
                s,
                persona::replay::Command {
                    events,
                    catalog,
                    dump,
                    dead_letters,
                    triggers,
                    serve,
                },
            )
        }
        Command::Evaluate {
            args,
            config,
            workers,
        } => {
            let s = settings(config, workers, None, false, |_| {})?;
            let e = persona::evaluate::evaluate(s, &args)?;
            println!(
                "{}: split {}: {} training and {} held-out events",
                e.label, e.split, e.train_events, e.test_events
            );
            print!(
                "{}{}",
                persona::evaluate::table_header(args.k),
                persona::evaluate::table_rows(&e)
            );
            Ok(())
        }
        Command::Validate(a) => persona::validate::validate(&a),
        Command::Generate(o) => persona::generate::generate(&o),
        Command::Produce(a) => persona::kafka_tools::produce(&a),
        Command::Record(a) => persona::kafka_tools::record(&a),
    }
}
