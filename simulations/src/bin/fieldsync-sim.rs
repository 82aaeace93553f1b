//! `fieldsync-sim`: run the deterministic simulator for one seed, sweep a range of seeds, or
//! replay a trace.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use fieldsync_schema::outln;
use fieldsync_simulations::{FaultSet, InjectedBug, Report, SimOptions, run};

#[derive(Parser)]
#[command(
    name = "fieldsync-sim",
    version,
    about = "Deterministic multi-device simulation of fieldsync under faults, and its load generator",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    sim: SimArgs,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Load a real relay over WebSockets and print JSON figures.
    Load(LoadArgs),
    /// Catch-up benchmarks with the real device library: a device pushing a long offline queue,
    /// and a new device pulling every entity. Prints JSON.
    Catchup(CatchupArgs),
}

#[derive(clap::Args)]
struct CatchupArgs {
    /// Writes queued on the returning device.
    #[arg(long, default_value_t = 10_000)]
    queued: usize,
    /// Entities on the relay when the new device pulls.
    #[arg(long, default_value_t = 50_000)]
    entities: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// Concurrent device sessions.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Total mutations (overrides --entities; spread over the devices).
    #[arg(long)]
    mutations: Option<u64>,
    /// Entities each device creates.
    #[arg(long, default_value_t = 10)]
    entities: usize,
    /// Updates of each entity after its create.
    #[arg(long, default_value_t = 1)]
    updates: usize,
    /// gated (workouts), lww (settings) or mixed.
    #[arg(long, default_value = "gated")]
    mix: fieldsync_simulations::load::Mix,
    /// Devices per space: live entries fan out to the others of the space.
    #[arg(long, default_value_t = 10)]
    space_size: usize,
    /// Mutations per push.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Pace the devices to this many mutations per second in total.
    #[arg(long)]
    rate: Option<f64>,
    /// Start a relay on a scratch directory (the default unless --relay is given).
    #[arg(long, conflicts_with = "relay")]
    spawn: bool,
    /// Load a running relay at this address (needs --data, its data directory, to enroll).
    #[arg(long, requires = "data")]
    relay: Option<String>,
    #[arg(long)]
    data: Option<PathBuf>,
    /// The running relay's process id, for CPU and memory figures.
    #[arg(long)]
    pid: Option<u32>,
    /// Apply threads of the spawned relay (`serve --workers`; default: the relay's).
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args)]
struct SimArgs {
    /// The seed of a single run.
    #[arg(long, default_value_t = 1, conflicts_with_all = ["seeds", "replay"])]
    seed: u64,
    /// Sweep a range of seeds, e.g. 1..50 (end exclusive).
    #[arg(long)]
    seeds: Option<String>,
    /// Number of devices.
    #[arg(long, default_value_t = 6)]
    devices: usize,
    /// User actions before healing and draining.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Faults to inject: all, none, or a list of latency,reset,lost_ack,partition,offline,
    /// relay_crash,device_crash,skew.
    #[arg(long, default_value = "all")]
    faults: FaultSet,
    /// Turn on a deliberate relay defect (skip_version_gate, ack_before_commit, ignore_receipts)
    /// to see the simulator catch it.
    #[arg(long)]
    bug: Option<InjectedBug>,
    /// Write every event to FILE (its first line holds the options, for --replay).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Rerun the run recorded in a trace file and compare.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Print JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

fn parse_range(s: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b) = s.split_once("..").context("--seeds expects A..B, e.g. 1..50")?;
    let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
    if a >= b {
        bail!("--seeds {a}..{b} is empty");
    }
    Ok(a..b)
}

fn print(report: &Report, json: bool) -> std::io::Result<()> {
    if json {
        outln!(
            "{}",
            serde_json::to_string(report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        )
    } else {
        use std::io::Write as _;
        write!(std::io::stdout().lock(), "{}", report.render())
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) if fieldsync_schema::cli::is_closed_pipe(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load(args: LoadArgs) -> anyhow::Result<bool> {
    use fieldsync_simulations::load::{self, LoadOptions, relay_proc::RelayProc};
    let (entities, updates) = match args.mutations {
        Some(m) => {
            let per_device = m.div_ceil(args.devices.max(1) as u64) as usize;
            (per_device.div_ceil(1 + args.updates).max(1), args.updates)
        }
        None => (args.entities, args.updates),
    };
    let relay = match (&args.relay, &args.data) {
        (Some(url), Some(data)) => RelayProc::existing(url, data, args.pid),
        _ => RelayProc::spawn_with(args.workers)?,
    };
    let opts = LoadOptions {
        devices: args.devices,
        entities,
        updates,
        mix: args.mix,
        space_size: args.space_size,
        batch: args.batch,
        rate: args.rate,
        seed: args.seed,
        progress: std::io::stderr().is_terminal(),
    };
    let report = load::run(&relay, &opts)?;
    outln!("{}", serde_json::to_string_pretty(&report)?)?;
    Ok(report.errors.is_empty())
}

fn real_main() -> anyhow::Result<bool> {
    let parsed = Cli::parse();
    match parsed.command {
        Some(Command::Load(args)) => return load(args),
        Some(Command::Catchup(args)) => {
            let relay = fieldsync_simulations::load::relay_proc::RelayProc::spawn()?;
            let report = fieldsync_simulations::load::catchup::run(&relay, args.queued, args.entities, args.seed)?;
            outln!("{}", serde_json::to_string_pretty(&report)?)?;
            return Ok(true);
        }
        None => {}
    }
    let cli = parsed.sim;
    let progress = std::io::stderr().is_terminal() && !cli.json;
    if let Some(path) = &cli.replay {
        let opts = fieldsync_simulations::trace::read_options(path)?;
        let replay_trace = path.with_extension("replay");
        let report = run(opts, Some(&replay_trace), progress)?;
        print(&report, cli.json)?;
        eprintln!("replayed {} (new trace: {})", path.display(), replay_trace.display());
        return Ok(report.ok());
    }
    let base = SimOptions {
        seed: cli.seed,
        devices: cli.devices,
        steps: cli.steps,
        faults: cli.faults.clone(),
        bug: cli.bug,
    };
    let Some(range) = cli.seeds.as_deref().map(parse_range).transpose()? else {
        let trace = cli
            .trace
            .clone()
            .or_else(|| Some(std::env::temp_dir().join(format!("fieldsync-sim-{}.trace", cli.seed))));
        let report = run(base, trace.as_deref(), progress)?;
        print(&report, cli.json)?;
        if !report.ok()
            && let Some(t) = trace
        {
            eprintln!(
                "seed {} violated {}; replay with: fieldsync-sim --replay {}",
                report.seed,
                report.violations[0].invariant,
                t.display()
            );
        }
        return Ok(report.ok());
    };
    let mut failed = Vec::new();
    let mut totals = (0u64, 0f64, 0f64);
    for seed in range.clone() {
        let opts = SimOptions { seed, ..base.clone() };
        let trace = std::env::temp_dir().join(format!("fieldsync-sim-{seed}.trace"));
        let report = run(opts, Some(&trace), false)?;
        totals.0 += report.stats.events;
        totals.1 += report.simulated_hours;
        totals.2 += report.wall_seconds;
        if cli.json {
            print(&report, true)?;
        } else {
            outln!(
                "seed {seed}: {} — {} events, {:.1} h simulated, {} applied, {} conflicts, trace {}",
                if report.ok() { "ok" } else { "VIOLATION" },
                report.stats.events,
                report.simulated_hours,
                report.mutations_applied,
                report.conflicts_prompted,
                &report.trace_hash[..16]
            )?;
        }
        if report.ok() {
            let _ = std::fs::remove_file(&trace);
        } else {
            if !cli.json {
                print(&report, false)?;
            }
            eprintln!("replay with: fieldsync-sim --replay {}", trace.display());
            failed.push(seed);
        }
    }
    if !cli.json {
        outln!(
            "sweep {}..{}: {} seeds, {} failed {:?}; {} events, {:.0} simulated hours, {:.0} events/s",
            range.start,
            range.end,
            range.end - range.start,
            failed.len(),
            failed,
            totals.0,
            totals.1,
            totals.0 as f64 / totals.2.max(1e-9)
        )?;
    }
    Ok(failed.is_empty())
}
