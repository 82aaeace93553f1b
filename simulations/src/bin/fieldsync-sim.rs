//! `fieldsync-sim`: run the deterministic simulator for one seed, sweep a range of seeds, or
//! replay a trace.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use fieldsync_schema::outln;
use fieldsync_simulations::{FaultSet, InjectedBug, Report, SimOptions, SwarmBounds, run};

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
    /// Crash soak with real processes: the relay killed with SIGKILL under load from many
    /// devices, then devices killed mid-write and mid-sync; prints figures (acknowledged writes
    /// lost, duplicates, audit chains) and fails unless every promise held.
    CrashSoak(CrashSoakArgs),
}

#[derive(clap::Args)]
struct CrashSoakArgs {
    /// Relay kills, one per cycle.
    #[arg(long, default_value_t = 100)]
    cycles: usize,
    /// Devices (the real device library) writing and syncing while the relay is killed.
    #[arg(long, default_value_t = 50)]
    devices: usize,
    #[arg(long, default_value_t = 10)]
    spaces: usize,
    /// Local writes per device per cycle.
    #[arg(long, default_value_t = 4)]
    writes: usize,
    /// Device processes (`fieldsync-peer put` / `sync`) started and killed at random moments.
    #[arg(long, default_value_t = 200)]
    device_cycles: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    json: bool,
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
    /// The devices do not offer compressed frames (what an older device gets): to measure
    /// what compression saves.
    #[arg(long)]
    no_compression: bool,
    /// The relay's records are journal entries dated over this many days back (e.g. 730),
    /// instead of patients: the data sync windows apply to.
    #[arg(long, value_name = "DAYS")]
    dated: Option<u32>,
    /// The new device syncs by windows (journal entries: the last 90 days).
    #[arg(long)]
    windowed: bool,
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
    /// Load a running relay at this address (needs --data, its data directory, or --store,
    /// its PostgreSQL store, to enroll).
    #[arg(long)]
    relay: Option<String>,
    #[arg(long, requires = "relay", conflicts_with = "store")]
    data: Option<PathBuf>,
    /// The PostgreSQL store of the running relay (`serve --store URL`): several load processes,
    /// each against another relay of the cluster, load one store together.
    #[arg(long, value_name = "URL", requires = "relay")]
    store: Option<String>,
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
    /// Turn on a deliberate relay defect (skip_version_gate, ack_before_commit, ignore_receipts,
    /// ignore_other_relays with --relays, skip_authority_settle with --wearables) to see the
    /// simulator catch it.
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
    /// The schema-upgrade workload: the relay moves v1 → v3 during the run and devices update
    /// at random steps (a swarm draws it for about a third of its seeds; this forces it on).
    #[arg(long)]
    upgrades: bool,
    /// The field-authority workload (SPEC §17): a service imports watch data into workouts
    /// people edit and imports runs people also log by hand; people merge or dismiss the
    /// duplicates the relay flags (a swarm draws it for 40 % of its seeds; this forces it on).
    #[arg(long)]
    wearables: bool,
    /// Relay processes on one shared store (1–8): devices land on any running relay and fail
    /// over when theirs crashes; relays hear of each other's commits through notifications that
    /// can be late or lost. Default 1; a swarm draws 2–3 for about a third of its seeds unless
    /// this is given.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=8))]
    relays: Option<u8>,
    /// Swarm testing: each seed draws its own shape (2–24 devices, 100–1,500 steps, the fault
    /// set and rate, hot-record skew, bursts); --devices, --steps and --faults are ignored.
    #[arg(long)]
    swarm: bool,
    /// The range a swarm seed draws its size from: `hunt` (2–24 devices, 100–1,500 steps) or
    /// `ci` (2–8 devices, 60–300 steps, what CI's sweep runs).
    #[arg(long, default_value = "hunt", requires = "swarm", value_parser = ["hunt", "ci"])]
    swarm_scale: String,
    /// Hunt with swarm seeds for this many minutes, on every core; prints seeds/s, events/s and
    /// every failing seed with its replay command.
    #[arg(long, requires = "swarm", conflicts_with_all = ["seeds", "replay"])]
    minutes: Option<f64>,
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
    let relay = match (&args.relay, &args.data, &args.store) {
        (Some(url), Some(data), _) => RelayProc::existing(url, data, args.pid),
        (Some(url), None, Some(store)) => RelayProc::existing_on_postgres(url, store, args.pid),
        (Some(_), None, None) => anyhow::bail!("--relay needs --data DIR or --store URL to enroll devices"),
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

fn crash_soak(args: CrashSoakArgs) -> anyhow::Result<bool> {
    use fieldsync_simulations::soak::{self, SoakOptions};
    let opts = SoakOptions {
        cycles: args.cycles,
        devices: args.devices,
        spaces: args.spaces,
        writes_per_cycle: args.writes,
        device_cycles: args.device_cycles,
        seed: args.seed,
        ..SoakOptions::default()
    };
    let (report, kept) = soak::run(&opts)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        let r = &report.relay;
        let d = &report.devices;
        outln!(
            "relay: {} kills ({} mid-round, {} sync rounds cut), {} writes, {} acknowledged checks, {} acknowledged lost, {} duplicates, {} lost after drain, {} audit failures; restart p50 {:.0} ms, max {:.0} ms; {:.0} s",
            r.relay_kills,
            r.kills_mid_round,
            r.syncs_cut,
            r.writes,
            r.acked_checked,
            r.acked_lost,
            r.duplicates,
            r.lost_after_drain,
            r.audit_failures,
            r.restart_ms_p50,
            r.restart_ms_max,
            r.seconds
        )?;
        outln!(
            "devices: {} kills ({} mid-write, {} mid-sync), {} writes acknowledged, {} acknowledged lost, {} failed to open, {} mutation ids reused, {} duplicates, {} lost after drain; {:.0} s",
            d.kills,
            d.kills_mid_write,
            d.kills_mid_sync,
            d.writes_acknowledged,
            d.acked_local_lost,
            d.opens_failed,
            d.mutation_ids_reused,
            d.duplicates,
            d.lost_after_drain,
            d.seconds
        )?;
        outln!("{}", if report.ok { "ok" } else { "FAILED" })?;
    }
    if let Some(dir) = kept {
        eprintln!("the soak failed; its files are kept in {}", dir.display());
    }
    Ok(report.ok)
}

fn real_main() -> anyhow::Result<bool> {
    let parsed = Cli::parse();
    match parsed.command {
        Some(Command::Load(args)) => return load(args),
        Some(Command::Catchup(args)) => {
            let relay = fieldsync_simulations::load::relay_proc::RelayProc::spawn()?;
            let report = fieldsync_simulations::load::catchup::run(
                &relay,
                args.queued,
                fieldsync_simulations::load::catchup::FreshDevice {
                    entities: args.entities,
                    dated_days: args.dated,
                    windowed: args.windowed,
                },
                args.seed,
                !args.no_compression,
            )?;
            outln!("{}", serde_json::to_string_pretty(&report)?)?;
            return Ok(true);
        }
        Some(Command::CrashSoak(args)) => return crash_soak(args),
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
        shape: Default::default(),
        upgrades: cli.upgrades,
        relays: cli.relays.map_or(1, usize::from),
        wearables: cli.wearables,
    };
    let bounds = if cli.swarm_scale == "ci" {
        SwarmBounds::CI
    } else {
        SwarmBounds::HUNT
    };
    let shape_of = |seed: u64| {
        if cli.swarm {
            let drawn = SimOptions::swarm(seed, bounds);
            SimOptions {
                bug: cli.bug,
                upgrades: cli.upgrades || drawn.upgrades,
                wearables: cli.wearables || drawn.wearables,
                relays: cli.relays.map_or(drawn.relays, usize::from),
                ..drawn
            }
        } else {
            SimOptions { seed, ..base.clone() }
        }
    };
    if let Some(minutes) = cli.minutes {
        return hunt(minutes, &shape_of);
    }
    let Some(range) = cli.seeds.as_deref().map(parse_range).transpose()? else {
        let trace = cli
            .trace
            .clone()
            .or_else(|| Some(std::env::temp_dir().join(format!("fieldsync-sim-{}.trace", cli.seed))));
        let report = run(shape_of(cli.seed), trace.as_deref(), progress)?;
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
        let opts = shape_of(seed);
        let trace = std::env::temp_dir().join(format!("fieldsync-sim-{seed}.trace"));
        let report = run(opts, Some(&trace), false).with_context(|| format!("seed {seed} could not run"))?;
        totals.0 += report.stats.events;
        totals.1 += report.simulated_hours;
        totals.2 += report.wall_seconds;
        if cli.json {
            print(&report, true)?;
        } else {
            outln!(
                "seed {seed}: {} — {} devices, {} steps, {} events, {:.1} h simulated, {} applied, {} conflicts, trace {}",
                if report.ok() { "ok" } else { "VIOLATION" },
                report.devices,
                report.steps,
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
            eprintln!(
                "replay with: fieldsync-sim {}--seed {seed} (or --replay {})",
                if cli.swarm {
                    format!("--swarm --swarm-scale {} ", cli.swarm_scale)
                } else {
                    format!(
                        "--devices {} --steps {} {}{}",
                        cli.devices,
                        cli.steps,
                        if cli.upgrades { "--upgrades " } else { "" },
                        if cli.wearables { "--wearables " } else { "" }
                    )
                },
                trace.display()
            );
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

/// `--swarm --minutes N`: runs swarm seeds on every core until the time is up, starting from a
/// seed drawn from the clock (printed, so the hunt's ground is known), and lists every failure
/// with the command that replays it.
fn hunt(minutes: f64, shape_of: &(dyn Fn(u64) -> SimOptions + Sync)) -> anyhow::Result<bool> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    anyhow::ensure!(
        minutes > 0.0 && minutes.is_finite(),
        "--minutes must be a positive number"
    );
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() * 1_000)
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let began = Instant::now();
    let next = AtomicU64::new(start);
    let totals = Mutex::new((0u64, 0u64, 0f64, Vec::<(u64, String)>::new()));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    outln!("hunting from seed {start} for {minutes} min on {threads} threads")?;
    let outcome: anyhow::Result<()> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    while Instant::now() < deadline {
                        let seed = next.fetch_add(1, Ordering::Relaxed);
                        let trace = std::env::temp_dir().join(format!("fieldsync-sim-{seed}.trace"));
                        let report = run(shape_of(seed), Some(&trace), false).with_context(|| {
                            format!("seed {seed} could not run; rerun with: fieldsync-sim --swarm --seed {seed}")
                        })?;
                        let Ok(mut t) = totals.lock() else { break };
                        t.0 += 1;
                        t.1 += report.stats.events;
                        t.2 += report.simulated_hours;
                        if report.ok() {
                            let _ = std::fs::remove_file(&trace);
                        } else {
                            let invariant = report
                                .violations
                                .first()
                                .map(|v| v.invariant.to_string())
                                .unwrap_or_default();
                            outln!(
                                "seed {seed}: VIOLATION ({invariant}); replay with: fieldsync-sim --swarm --seed {seed} (or --replay {})",
                                trace.display()
                            )?;
                            t.3.push((seed, invariant));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("a hunting thread panicked"))??;
        }
        Ok(())
    });
    outcome?;
    let wall = began.elapsed().as_secs_f64().max(1e-9);
    let t = totals.lock().map_err(|_| anyhow::anyhow!("hunt totals poisoned"))?;
    outln!(
        "hunt: {} seeds in {:.0} s ({:.2} seeds/s), {} events ({:.0} events/s), {:.0} simulated hours; {} failed {:?}",
        t.0,
        wall,
        t.0 as f64 / wall,
        t.1,
        t.1 as f64 / wall,
        t.2,
        t.3.len(),
        t.3.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    )?;
    Ok(t.3.is_empty())
}
