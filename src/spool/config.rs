//! The daemon's configuration: a TOML file over the defaults of a board (`board/*.toml`,
//! built into the binary). Everything is validated here, once: sizes become byte counts,
//! policies enums, paths absolute, output reports ready-made decoders. Nothing downstream
//! parses strings. `docs/spool.md` documents every key.

use super::crop::{Border, RoiSpec};
use super::publish_config::{PublishConfig, RawPublish};
use super::results::{BoxDecoder, BoxSpec, LandmarkSpec, OutputReport};
use crate::memory::Bytes;
use crate::model::{ColorOrder, ResizeMode, package::read_labels};
use crate::runtime::{Eviction, LayerCache, LoadingPolicy, MAX_PARALLEL, SchedulingPolicy};
use crate::tiling::Tiling;
use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The board files of `board/`, by name.
const BOARDS: [(&str, &str); 6] = [
    ("pi-zero-2w", include_str!("../../board/pi-zero-2w.toml")),
    ("pi3b", include_str!("../../board/pi3b.toml")),
    ("pi4-2g", include_str!("../../board/pi4-2g.toml")),
    ("pi4-4g", include_str!("../../board/pi4-4g.toml")),
    ("pi5", include_str!("../../board/pi5.toml")),
    ("qemu-virt", include_str!("../../board/qemu-virt.toml")),
];

/// Defaults with no board and no setting: the spool the Yocto layer installs
/// (`yocto/meta-memaflow/.../paths.env`).
pub(crate) const DEFAULT_SPOOL: &str = "/var/spool/memaflow";
/// The configuration file `memaflow run` reads without `--config` (where the Yocto
/// layer installs it).
pub const DEFAULT_CONFIG: &str = "/etc/memaflow/memaflow.toml";
const DEFAULT_RESERVE: u64 = 16 << 20;
const DEFAULT_MAX_FRAME: u64 = 64 << 20;
const DEFAULT_RESCAN_SECS: f64 = 10.0;
const DEFAULT_SETTLE_SECS: f64 = 2.0;
const DEFAULT_TOP_K: usize = 5;
/// Most frames processed at once: each holds its decoded image while it is preprocessed.
pub(crate) const MAX_FRAMES_IN_FLIGHT: usize = 64;
/// SIGTERM to exit: systemd's and the issue's 5 s, less a margin for the last writes.
const DEFAULT_STOP_GRACE_SECS: f64 = 4.0;
/// A frame in flight this long is taken for wedged: far beyond a slow frame on the
/// smallest board (seconds), short enough that systemd restarts a stuck daemon the same
/// hour.
const DEFAULT_STALL_SECS: f64 = 300.0;
/// Free space below which no frame is claimed: room for the results and status of the
/// frames in hand.
const DEFAULT_MIN_FREE: u64 = 1 << 20;
/// A frame in flight at this many stops (crashes, kills, watchdog restarts) is failed:
/// one stop may be bad luck (a power cut), the third in a row is the frame.
const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// A size written as `"256M"` or as a plain number of bytes.
#[derive(Clone, Copy, Debug)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(s) => s
                .parse::<Bytes>()
                .map(|b| Size(b.0))
                .map_err(|e| serde::de::Error::custom(format!("{e:#}"))),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    budget: Option<Size>,
    reserve: Option<Size>,
    loading: Option<LoadingPolicy>,
    scheduling: Option<SchedulingPolicy>,
    parallel: Option<usize>,
    threads: Option<usize>,
    tiling: Option<Tiling>,
    cache: Option<LayerCache>,
    eviction: Option<Eviction>,
    frames_in_flight: Option<usize>,
}

impl RawRun {
    /// `self`'s settings where it has them, `under`'s elsewhere.
    fn over(self, under: RawRun) -> RawRun {
        RawRun {
            budget: self.budget.or(under.budget),
            reserve: self.reserve.or(under.reserve),
            loading: self.loading.or(under.loading),
            scheduling: self.scheduling.or(under.scheduling),
            parallel: self.parallel.or(under.parallel),
            threads: self.threads.or(under.threads),
            tiling: self.tiling.or(under.tiling),
            cache: self.cache.or(under.cache),
            eviction: self.eviction.or(under.eviction),
            frames_in_flight: self.frames_in_flight.or(under.frames_in_flight),
        }
    }
}

impl RawRun {
    /// The `[run]` section (over the board's) checked, with the defaults filled in.
    fn checked(self) -> Result<RunConfig> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let parallel = self.parallel.unwrap_or(1);
        ensure!(
            (1..=MAX_PARALLEL).contains(&parallel),
            "run.parallel must be 1 to {MAX_PARALLEL}"
        );
        ensure!(threads >= 1, "run.threads must be at least 1");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let frames_in_flight = self.frames_in_flight.unwrap_or(cpus);
        ensure!(
            (1..=MAX_FRAMES_IN_FLIGHT).contains(&frames_in_flight),
            "run.frames_in_flight must be 1 to {MAX_FRAMES_IN_FLIGHT}"
        );
        let tiling = self.tiling.unwrap_or_default();
        tiling.check_shared().context("run.tiling")?;
        Ok(RunConfig {
            budget: self.budget.map(|s| s.0),
            reserve: self.reserve.map_or(DEFAULT_RESERVE, |s| s.0),
            loading: self.loading.unwrap_or(LoadingPolicy::Partial),
            scheduling: self.scheduling.unwrap_or(SchedulingPolicy::Mema),
            parallel,
            threads,
            tiling,
            cache: self.cache.unwrap_or_default(),
            eviction: self.eviction.unwrap_or_default(),
            frames_in_flight,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoard {
    name: String,
    memory: Size,
    #[serde(default)]
    device_tree: Vec<String>,
    run: RawRun,
    /// Read by `tests/qemu/run` (the cgroup limit of the full-system test), not here.
    #[serde(default, rename = "test")]
    _test: Option<toml::Table>,
}

/// A board: its memory and the run settings that suit it.
#[derive(Clone, Debug)]
pub(crate) struct Board {
    pub name: String,
    pub memory: u64,
    device_tree: Vec<String>,
    run: RawRun,
}

impl Board {
    /// A built-in board by name, or a board file by path.
    pub(crate) fn named(name: &str) -> Result<Board> {
        if let Some((_, text)) = BOARDS.iter().find(|(n, _)| *n == name) {
            return Board::parse(text).with_context(|| format!("built-in board {name}"));
        }
        let path = Path::new(name);
        if name.ends_with(".toml") && path.is_file() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            return Board::parse(&text).with_context(|| path.display().to_string());
        }
        bail!(
            "unknown board '{name}' (known: {}; or give a board file path ending in .toml)",
            BOARDS.map(|(n, _)| n).join(", ")
        )
    }

    fn parse(text: &str) -> Result<Board> {
        let raw: RawBoard = toml::from_str(text)?;
        Ok(Board {
            name: raw.name,
            memory: raw.memory.0,
            device_tree: raw.device_tree,
            run: raw.run,
        })
    }

    pub fn all() -> Result<Vec<Board>> {
        BOARDS.iter().map(|(n, _)| Board::named(n)).collect()
    }

    /// The board whose device-tree model matches, with the least memory that is at least
    /// `mem_total` (MemTotal is below the RAM fitted: the kernel and GPU take their share),
    /// else the largest matching one.
    pub fn detect(device_tree_model: &str, mem_total: u64) -> Result<Option<Board>> {
        let model = device_tree_model.trim_end_matches('\0').trim();
        let mut matching: Vec<Board> = Board::all()?
            .into_iter()
            .filter(|b| b.device_tree.iter().any(|p| model.starts_with(p.as_str())))
            .collect();
        matching.sort_by_key(|b| b.memory);
        let fits = matching.iter().position(|b| b.memory >= mem_total);
        Ok(match fits {
            Some(i) => Some(matching.swap_remove(i)),
            None => matching.pop(),
        })
    }

    /// The board of this machine, from `/proc/device-tree/model` and `/proc/meminfo`.
    fn of_this_machine() -> Result<Option<Board>> {
        let Ok(model) = std::fs::read("/proc/device-tree/model") else {
            return Ok(None);
        };
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024);
        Board::detect(&String::from_utf8_lossy(&model), mem_total)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    board: Option<String>,
    log_level: Option<String>,
    #[serde(default)]
    spool: RawSpool,
    #[serde(default)]
    run: RawRun,
    #[serde(default)]
    models: RawModels,
    #[serde(default)]
    model: Vec<RawModel>,
    /// `memaflow publish`'s section; the daemon checks it and leaves it alone.
    publish: Option<RawPublish>,
    #[serde(default)]
    debug: RawDebug,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebug {
    dump_inputs: Option<PathBuf>,
}

/// Aids for checking a pipeline, off by default.
#[derive(Clone, Debug, Default)]
pub struct DebugConfig {
    /// Every inference's input tensor is written here as `.npy` (docs/spool.md).
    pub(crate) dump_inputs: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    root: Option<PathBuf>,
    done: Option<DonePolicy>,
    max_frame_bytes: Option<Size>,
    rescan_secs: Option<f64>,
    settle_secs: Option<f64>,
    stop_grace_secs: Option<f64>,
    stall_secs: Option<f64>,
    min_free: Option<Size>,
    max_attempts: Option<u32>,
    metrics: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModels {
    dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: PathBuf,
    #[serde(default)]
    report: ReportKind,
    top_k: Option<usize>,
    labels: Option<PathBuf>,
    #[serde(default)]
    preprocess: PreprocessOverride,
    boxes: Option<BoxSpec>,
    input: Option<RawInput>,
    landmarks: Option<LandmarkSpec>,
}

/// `[model.input]`: a cascade's source and region (docs/spool.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    from: String,
    rotate_by: Option<[usize; 2]>,
    #[serde(default)]
    angle: f32,
    #[serde(default)]
    scale: Option<Scale>,
    #[serde(default)]
    shift: [f32; 2],
    #[serde(default)]
    square: bool,
    max: Option<usize>,
    #[serde(default)]
    border: Border,
}

/// One factor for both axes, or `[x, y]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scale {
    Both(f32),
    Each([f32; 2]),
}

/// Detections a cascade runs on, at most, by default.
const DEFAULT_CASCADE_MAX: usize = 8;
/// At most, ever: each is an inference, and the frame is held until all are submitted.
pub(crate) const MAX_CASCADE: usize = 64;

/// A model that runs on crops of an earlier model's detections.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CascadeConfig {
    /// The source model's name (its package's name).
    pub from: String,
    pub(crate) roi: RoiSpec,
    /// The best `max` detections get a crop each.
    pub max: usize,
    pub(crate) border: Border,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ReportKind {
    #[default]
    Summary,
    Raw,
    Topk,
    Boxes,
    Landmarks,
}

/// What happens to a frame once its result is written.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DonePolicy {
    /// Moved to `done/`.
    #[default]
    Move,
    /// Unlinked.
    Delete,
}

/// Per-model changes to the manifest's preprocessing.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct PreprocessOverride {
    pub(crate) resize: Option<ResizeMode>,
    pub(crate) color: Option<ColorOrder>,
    pub(crate) mean: Option<Vec<f32>>,
    pub(crate) std: Option<Vec<f32>>,
}

impl PreprocessOverride {
    pub(crate) fn apply(&self, base: &crate::model::Preprocess) -> crate::model::Preprocess {
        crate::model::Preprocess {
            resize: self.resize.unwrap_or(base.resize),
            color: self.color.unwrap_or(base.color),
            mean: self.mean.clone().unwrap_or_else(|| base.mean.clone()),
            std: self.std.clone().unwrap_or_else(|| base.std.clone()),
        }
    }
}

/// One configured model: where its package is and how its outputs are reported.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The package's directory, absolute.
    pub path: PathBuf,
    pub(crate) preprocess: PreprocessOverride,
    pub(crate) report: OutputReport,
    /// Set for a cascade: its input is crops of another model's detections.
    pub(crate) input: Option<CascadeConfig>,
}

#[derive(Clone, Debug)]
pub(crate) struct SpoolConfig {
    pub root: PathBuf,
    pub done: DonePolicy,
    pub(crate) max_frame_bytes: u64,
    /// How often `incoming/` is listed even without an inotify event.
    pub(crate) rescan: Duration,
    /// A file found by a rescan (not announced by a rename or close-after-write) is taken
    /// once it has been unchanged this long: it may still be being written.
    pub(crate) settle: Duration,
    /// After SIGTERM, how long the frame in hand may take before it is put back.
    pub(crate) stop_grace: Duration,
    /// A frame in flight longer than this counts as wedged: the watchdog pings stop.
    pub(crate) stall: Duration,
    /// Bytes the spool's file system must have free for a frame to be claimed.
    pub min_free: u64,
    /// How many times a frame is processed before a run that never finishes it (the
    /// daemon stopped while it was in flight) fails it.
    pub max_attempts: u32,
    /// The Prometheus text file (node_exporter's textfile collector), if any.
    pub metrics: Option<PathBuf>,
}

/// `[run]` as checked: how the daemon's executor schedules, bounds and caches; the
/// board's defaults filled in. Also written to `status.json`, so what ran is on record.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunConfig {
    /// Upper bound on the ledger, bytes (`None`: only live readings bound it).
    pub budget: Option<u64>,
    /// Bytes kept free below MemAvailable and the cgroup limit.
    pub reserve: u64,
    /// The loading policy.
    pub loading: LoadingPolicy,
    /// The scheduling policy.
    pub scheduling: SchedulingPolicy,
    /// Inferences in flight at once.
    pub parallel: usize,
    pub(crate) threads: usize,
    /// Whether and how models run tiled.
    pub tiling: Tiling,
    /// Whether layers stay resident across frames (docs/runtime.md).
    pub cache: LayerCache,
    /// Which resident layer goes first when room is needed.
    pub eviction: Eviction,
    /// Frames claimed and processed at once; all their inferences share the one gate.
    pub frames_in_flight: usize,
}

/// The daemon's configuration file, checked once at start: sizes are bytes, policies
/// enums, paths absolute; nothing downstream parses a string of it.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) board: Option<String>,
    pub(crate) log_level: log::LevelFilter,
    pub(crate) spool: SpoolConfig,
    pub(crate) run: RunConfig,
    /// The models run on every frame, in the order results list them.
    pub models: Vec<ModelConfig>,
    pub(crate) debug: DebugConfig,
}

/// Reads the configuration file `path` and parses it with `parse`, relative paths taken
/// from the file's directory; errors name the file.
fn read_config<T>(path: &Path, parse: impl FnOnce(&str, &Path) -> Result<T>) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration {}", path.display()))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parse(&text, base).with_context(|| path.display().to_string())
}

impl Config {
    /// Reads `path`; `board` (from the command line) overrides the file's `board`, and
    /// with neither the board is detected.
    pub(crate) fn load(path: &Path, board: Option<&str>) -> Result<Config> {
        read_config(path, |text, base| Config::parse(text, base, board))
    }

    /// Parses a configuration; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path, board: Option<&str>) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text)?;
        let board = match board.or(raw.board.as_deref()) {
            Some(name) => Some(Board::named(name)?),
            None => Board::of_this_machine()?,
        };
        let run = raw
            .run
            .over(board.as_ref().map(|b| b.run.clone()).unwrap_or_default());
        let run = run.checked()?;
        let secs = |v: Option<f64>, default: f64, key: &str| -> Result<Duration> {
            let v = v.unwrap_or(default);
            ensure!(
                v.is_finite() && (0.0..=86400.0).contains(&v),
                "spool.{key} must be between 0 and 86400 seconds"
            );
            Ok(Duration::from_secs_f64(v))
        };
        let spool = SpoolConfig {
            root: absolute(
                base,
                &raw.spool.root.unwrap_or_else(|| DEFAULT_SPOOL.into()),
            ),
            done: raw.spool.done.unwrap_or_default(),
            max_frame_bytes: raw.spool.max_frame_bytes.map_or(DEFAULT_MAX_FRAME, |s| s.0),
            rescan: secs(raw.spool.rescan_secs, DEFAULT_RESCAN_SECS, "rescan_secs")?,
            settle: secs(raw.spool.settle_secs, DEFAULT_SETTLE_SECS, "settle_secs")?,
            stop_grace: secs(
                raw.spool.stop_grace_secs,
                DEFAULT_STOP_GRACE_SECS,
                "stop_grace_secs",
            )?,
            stall: secs(raw.spool.stall_secs, DEFAULT_STALL_SECS, "stall_secs")?,
            min_free: raw.spool.min_free.map_or(DEFAULT_MIN_FREE, |s| s.0),
            max_attempts: raw.spool.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            metrics: raw.spool.metrics.map(|m| absolute(base, &m)),
        };
        ensure!(
            spool.stall >= Duration::from_millis(100),
            "spool.stall_secs must be at least 0.1"
        );
        ensure!(
            spool.max_attempts >= 1,
            "spool.max_attempts must be at least 1 (the first processing is an attempt)"
        );
        if let Some(m) = &spool.metrics {
            ensure!(
                m.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(".prom")),
                "spool.metrics must name a file ending in .prom (node_exporter reads only those)"
            );
        }
        ensure!(
            spool.rescan >= Duration::from_millis(100),
            "spool.rescan_secs must be at least 0.1"
        );
        let log_level = log_level(raw.log_level.as_deref())?;
        if let Some(publish) = raw.publish {
            publish.validate(base)?;
        }
        let models = models_of(raw.model, raw.models.dir.map(|d| absolute(base, &d)), base)?;
        Ok(Config {
            board: board.map(|b| b.name),
            log_level,
            spool,
            run,
            models,
            debug: DebugConfig {
                dump_inputs: raw.debug.dump_inputs.map(|d| absolute(base, &d)),
            },
        })
    }
}

/// What `memaflow publish` reads from the daemon's file: the spool and `[publish]`. The
/// models and the board are the daemon's business, so they are parsed (unknown keys are
/// still errors) but not checked against the disk. Only the `publish` feature reads it
/// (and this module's tests).
#[cfg_attr(not(feature = "publish"), allow(dead_code))]
#[derive(Clone, Debug)]
pub(crate) struct PublisherConfig {
    pub spool_root: PathBuf,
    /// How often `out/` is listed in full, besides inotify's events.
    pub(crate) rescan: Duration,
    pub(crate) log_level: log::LevelFilter,
    pub publish: PublishConfig,
}

#[cfg_attr(not(feature = "publish"), allow(dead_code))]
impl PublisherConfig {
    pub(crate) fn load(path: &Path) -> Result<PublisherConfig> {
        read_config(path, PublisherConfig::parse)
    }

    pub fn parse(text: &str, base: &Path) -> Result<PublisherConfig> {
        let raw: RawConfig = toml::from_str(text)?;
        let publish = raw
            .publish
            .context("no [publish] section: nothing says where to publish")?
            .validate(base)?;
        let rescan = raw.spool.rescan_secs.unwrap_or(DEFAULT_RESCAN_SECS);
        ensure!(
            rescan.is_finite() && (0.1..=86400.0).contains(&rescan),
            "spool.rescan_secs must be between 0.1 and 86400"
        );
        Ok(PublisherConfig {
            spool_root: absolute(
                base,
                &raw.spool.root.unwrap_or_else(|| DEFAULT_SPOOL.into()),
            ),
            rescan: Duration::from_secs_f64(rescan),
            log_level: log_level(raw.log_level.as_deref())?,
            publish,
        })
    }
}

/// The `[[model]]` entries, or with none every package in `[models] dir`.
fn models_of(
    raw_models: Vec<RawModel>,
    models_dir: Option<PathBuf>,
    base: &Path,
) -> Result<Vec<ModelConfig>> {
    if raw_models.is_empty() {
        let Some(dir) = &models_dir else {
            bail!("no models: give [models] dir or one or more [[model]] entries")
        };
        return Ok(packages_in(dir)?
            .into_iter()
            .map(|path| ModelConfig {
                path,
                preprocess: PreprocessOverride::default(),
                report: OutputReport::Summary,
                input: None,
            })
            .collect());
    }
    let from = models_dir.as_deref().unwrap_or(base);
    raw_models
        .into_iter()
        .enumerate()
        .map(|(k, m)| {
            let path = m.path.display().to_string();
            model_config(m, from, base).with_context(|| format!("[[model]] {} ({path})", k + 1))
        })
        .collect()
}

fn log_level(text: Option<&str>) -> Result<log::LevelFilter> {
    match text {
        None => Ok(log::LevelFilter::Info),
        Some(l) => l.parse().with_context(|| {
            format!("log_level '{l}' (use off, error, warn, info, debug or trace)")
        }),
    }
}

fn model_config(m: RawModel, from: &Path, base: &Path) -> Result<ModelConfig> {
    let labels = m
        .labels
        .as_deref()
        .map(|p| read_labels(&absolute(base, p)))
        .transpose()?;
    ensure!(
        m.report == ReportKind::Topk || (m.top_k.is_none() && labels.is_none()),
        "top_k and labels go with report = \"topk\""
    );
    ensure!(
        m.report == ReportKind::Boxes || m.boxes.is_none(),
        "[model.boxes] goes with report = \"boxes\""
    );
    ensure!(
        (m.report == ReportKind::Landmarks) == m.input.is_some()
            && (m.report == ReportKind::Landmarks) == m.landmarks.is_some(),
        "a cascade has [model.input], report = \"landmarks\" and [model.landmarks], all three"
    );
    let report = match m.report {
        ReportKind::Summary => OutputReport::Summary,
        ReportKind::Raw => OutputReport::Raw,
        ReportKind::Topk => {
            let k = m.top_k.unwrap_or(DEFAULT_TOP_K);
            ensure!(k >= 1, "top_k must be at least 1");
            OutputReport::TopK { k, labels }
        }
        ReportKind::Boxes => OutputReport::Boxes(Box::new(BoxDecoder::new(
            m.boxes
                .context("report = \"boxes\" needs a [model.boxes] table")?,
        )?)),
        ReportKind::Landmarks => OutputReport::Landmarks(Box::new(
            m.landmarks
                .context("checked above: landmarks go with input")?,
        )),
    };
    let input = m.input.map(cascade_config).transpose()?;
    let p = &m.preprocess;
    ensure!(
        p.mean.as_ref().map(Vec::len) == p.std.as_ref().map(Vec::len),
        "preprocess.mean and preprocess.std go together, with as many values"
    );
    if let Some(std) = &p.std {
        ensure!(
            std.iter().all(|s| s.is_finite() && *s != 0.0),
            "preprocess.std must be finite and non-zero"
        );
    }
    Ok(ModelConfig {
        path: absolute(from, &m.path),
        preprocess: m.preprocess,
        report,
        input,
    })
}

fn cascade_config(raw: RawInput) -> Result<CascadeConfig> {
    let scale = match raw.scale {
        None => [1.0, 1.0],
        Some(Scale::Both(s)) => [s, s],
        Some(Scale::Each(s)) => s,
    };
    ensure!(
        scale.iter().all(|s| s.is_finite() && *s > 0.0),
        "input.scale must be positive"
    );
    ensure!(
        raw.shift.iter().all(|s| s.is_finite()) && raw.angle.is_finite(),
        "input.shift and input.angle must be finite"
    );
    let max = raw.max.unwrap_or(DEFAULT_CASCADE_MAX);
    ensure!(
        (1..=MAX_CASCADE).contains(&max),
        "input.max must be 1 to {MAX_CASCADE}"
    );
    if let Some([a, b]) = raw.rotate_by {
        ensure!(a != b, "input.rotate_by needs two different keypoints");
    }
    Ok(CascadeConfig {
        from: raw.from,
        roi: RoiSpec {
            rotate_by: raw.rotate_by,
            angle: raw.angle.to_radians(),
            scale,
            shift: raw.shift,
            square: raw.square,
        },
        max,
        border: raw.border,
    })
}

fn absolute(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Every directory in `dir` holding a `model.toml`, sorted by name.
fn packages_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("listing models in {}", dir.display()))?;
    let mut out = vec![];
    for e in entries {
        let path = e?.path();
        if path.join(crate::model::package::MANIFEST_FILE).is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_yocto_layers_configuration_parses() {
        let text =
            include_str!("../../yocto/meta-memaflow/recipes-memaflow/memaflow/files/memaflow.toml");
        let models = std::env::temp_dir().join(format!("memaflow-cfg-{}", std::process::id()));
        std::fs::create_dir_all(models.join("pkg")).unwrap();
        std::fs::write(models.join("pkg/model.toml"), "").unwrap();
        std::fs::create_dir_all(models.join("not-a-package")).unwrap();
        let text = text.replace("/usr/share/memaflow/models", models.to_str().unwrap());
        let c = Config::parse(&text, Path::new("/etc/memaflow"), Some("pi4-2g")).unwrap();
        assert_eq!(c.spool.root, Path::new(DEFAULT_SPOOL));
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].path, models.join("pkg"));
        std::fs::remove_dir_all(&models).unwrap();
        // The built-in defaults are the layer's paths.
        let paths =
            include_str!("../../yocto/meta-memaflow/recipes-memaflow/memaflow/files/paths.env");
        assert!(paths.contains(&format!("MEMAFLOW_CONFIG={DEFAULT_CONFIG}\n")));
        assert!(paths.contains(&format!("MEMAFLOW_SPOOL={DEFAULT_SPOOL}\n")));
        // The unit runs the daemon on that configuration, may write only the spool, and
        // runs as the user that owns the spool.
        let unit = include_str!(
            "../../yocto/meta-memaflow/recipes-memaflow/memaflow/files/memaflow.service"
        );
        let key = |k: &str| -> Vec<&str> {
            unit.lines()
                .filter_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .collect()
        };
        assert_eq!(
            key("ExecStart"),
            [format!("/usr/bin/memaflow run --config {DEFAULT_CONFIG}")]
        );
        assert_eq!(
            key("ReadWritePaths"),
            [DEFAULT_SPOOL, "-/var/lib/memaflow/metrics"]
        );
        assert_eq!(
            c.spool.metrics.as_deref(),
            Some(Path::new("/var/lib/memaflow/metrics/memaflow.prom"))
        );
        assert_eq!(key("Type"), ["notify"]);
        assert_eq!(key("RestrictAddressFamilies"), ["AF_UNIX"]);
        let user = key("User");
        assert_eq!(user.len(), 1);
        let tmpfiles = include_str!(
            "../../yocto/meta-memaflow/recipes-memaflow/memaflow/files/memaflow-tmpfiles.conf"
        );
        let spool_entry = tmpfiles
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() >= 5 && f[0] == "d" && f[1] == DEFAULT_SPOOL)
            .expect("tmpfiles creates the spool");
        assert_eq!(
            spool_entry[3], user[0],
            "the spool's owner is the unit's user"
        );
    }

    #[test]
    fn every_board_parses_and_detection_picks_by_memory() {
        let boards = Board::all().unwrap();
        assert_eq!(boards.len(), BOARDS.len());
        for b in &boards {
            assert!(
                b.run.budget.is_some() && b.run.threads.is_some(),
                "{}",
                b.name
            );
        }
        let pick = |model: &str, mib: u64| {
            Board::detect(model, mib << 20)
                .unwrap()
                .map(|b| b.name)
                .unwrap_or_default()
        };
        assert_eq!(pick("Raspberry Pi 4 Model B Rev 1.4\0", 1850), "pi4-2g");
        assert_eq!(pick("Raspberry Pi 4 Model B Rev 1.4\0", 3800), "pi4-4g");
        assert_eq!(pick("Raspberry Pi 4 Model B Rev 1.5\0", 7800), "pi4-4g");
        assert_eq!(pick("Raspberry Pi Zero 2 W Rev 1.0\0", 420), "pi-zero-2w");
        assert_eq!(pick("linux,dummy-virt\0", 480), "qemu-virt");
        assert_eq!(pick("Some other board", 480), "");
    }

    #[test]
    fn config_layers_over_the_board_and_checks_keys() {
        let text = r#"
            board = "pi-zero-2w"
            log_level = "debug"
            [spool]
            root = "spool"
            done = "delete"
            max_frame_bytes = "1M"
            [run]
            parallel = 2
            [[model]]
            path = "pkgs/face"
            report = "topk"
            top_k = 3
            [model.preprocess]
            resize = "letterbox"
        "#;
        let c = Config::parse(text, Path::new("/etc/x"), None).unwrap();
        assert_eq!(c.board.as_deref(), Some("pi-zero-2w"));
        assert_eq!(c.run.budget, Some(160 << 20));
        assert_eq!(c.run.parallel, 2);
        assert_eq!(c.run.threads, 4);
        assert_eq!(c.run.tiling, Tiling::Needed);
        assert_eq!(c.spool.root, Path::new("/etc/x/spool"));
        assert_eq!(c.spool.done, DonePolicy::Delete);
        assert_eq!(c.spool.max_frame_bytes, 1 << 20);
        assert_eq!(c.log_level, log::LevelFilter::Debug);
        assert_eq!(c.models[0].path, Path::new("/etc/x/pkgs/face"));
        assert!(matches!(
            c.models[0].report,
            OutputReport::TopK { k: 3, .. }
        ));
        assert_eq!(c.models[0].preprocess.resize, Some(ResizeMode::Letterbox));
        // --board wins over the file's board.
        let c = Config::parse(text, Path::new("/"), Some("pi4-2g")).unwrap();
        assert_eq!(c.run.budget, Some(1 << 30));
        let auto = text.replace("parallel = 2", "tiling = \"auto\"");
        let c = Config::parse(&auto, Path::new("/"), None).unwrap();
        assert_eq!(c.run.tiling, Tiling::Auto);

        for bad in [
            "[spool]\nroot = 3\n[[model]]\npath = \"m\"",
            "[spool]\nsurprise = 1\n[[model]]\npath = \"m\"",
            "[run]\nbudget = \"12Q\"\n[[model]]\npath = \"m\"",
            "[run]\nloading = \"eager\"\n[[model]]\npath = \"m\"",
            "[run]\nparallel = 0\n[[model]]\npath = \"m\"",
            "[run]\nparallel = 17\n[[model]]\npath = \"m\"",
            "[run]\ntiling = \"sometimes\"\n[[model]]\npath = \"m\"",
            "[spool]\nstop_grace_secs = -1\n[[model]]\npath = \"m\"",
            "[spool]\nmax_attempts = 0\n[[model]]\npath = \"m\"",
            "[spool]\nmax_attempts = -1\n[[model]]\npath = \"m\"",
            "board = \"pi9\"\n[[model]]\npath = \"m\"",
            "[[model]]\npath = \"m\"\ntop_k = 3",
            "[[model]]\npath = \"m\"\nreport = \"boxes\"",
            "[[model]]\npath = \"m\"\n[model.preprocess]\nmean = [1.0]",
            "log_level = \"loud\"\n[[model]]\npath = \"m\"",
            "[spool]\nroot = \"/s\"",
        ] {
            assert!(
                Config::parse(bad, Path::new("/"), None).is_err(),
                "accepted: {bad}"
            );
        }
    }

    #[test]
    fn cascade_keys() {
        let text = r#"
            [[model]]
            path = "face"
            [[model]]
            path = "mesh"
            report = "landmarks"
            [model.input]
            from = "face"
            rotate_by = [0, 1]
            angle = 90
            scale = 1.5
            shift = [0.0, -0.5]
            square = true
            max = 3
            border = "zero"
            [model.landmarks]
            points = "p"
            presence = "f"
            sigmoid = true
            [debug]
            dump_inputs = "dump"
        "#;
        let c = Config::parse(text, Path::new("/etc/x"), Some("pi4-2g")).unwrap();
        let input = c.models[1].input.as_ref().unwrap();
        assert_eq!(input.from, "face");
        assert_eq!(input.max, 3);
        assert_eq!(input.border, Border::Zero);
        assert_eq!(input.roi.rotate_by, Some([0, 1]));
        assert!((input.roi.angle - std::f32::consts::FRAC_PI_2).abs() < 1e-6);
        assert_eq!(input.roi.scale, [1.5, 1.5]);
        assert_eq!(input.roi.shift, [0.0, -0.5]);
        assert!(input.roi.square);
        assert!(matches!(c.models[1].report, OutputReport::Landmarks(_)));
        assert_eq!(
            c.debug.dump_inputs.as_deref(),
            Some(Path::new("/etc/x/dump"))
        );
        assert!(c.models[0].input.is_none());
        for (from, to) in [
            ("max = 3", "max = 0"),
            ("max = 3", "max = 65"),
            ("scale = 1.5", "scale = -1"),
            ("scale = 1.5", "scale = [1.5]"),
            ("rotate_by = [0, 1]", "rotate_by = [1, 1]"),
            ("border = \"zero\"", "border = \"wrap\""),
            ("report = \"landmarks\"", "report = \"summary\""),
            ("[model.landmarks]", "[model.landmarks]\nsurprise = 1"),
            ("square = true", "square = true\nsurprise = 1"),
        ] {
            let bad = text.replace(from, to);
            assert!(
                Config::parse(&bad, Path::new("/"), Some("pi4-2g")).is_err(),
                "accepted: {to}"
            );
        }
    }

    #[test]
    fn the_publisher_reads_the_daemons_file() {
        let text = r#"
            log_level = "debug"
            [spool]
            root = "spool"
            rescan_secs = 0.5
            [[model]]
            path = "/nowhere/face"
            [publish]
            host = "broker"
        "#;
        let c = PublisherConfig::parse(text, Path::new("/etc/x")).unwrap();
        assert_eq!(c.spool_root, Path::new("/etc/x/spool"));
        assert_eq!(c.rescan, Duration::from_millis(500));
        assert_eq!(c.log_level, log::LevelFilter::Debug);
        assert_eq!(c.publish.host, "broker");
        // The daemon takes the same file, and refuses a broken [publish] section.
        assert!(Config::parse(text, Path::new("/etc/x"), Some("pi4-2g")).is_ok());
        let bad = text.replace("host = \"broker\"", "host = \"broker\"\nkeep = 0");
        assert!(Config::parse(&bad, Path::new("/etc/x"), Some("pi4-2g")).is_err());
        let none = text.replace("[publish]\n            host = \"broker\"", "");
        let err = PublisherConfig::parse(&none, Path::new("/")).unwrap_err();
        assert!(
            format!("{err:#}").contains("no [publish] section"),
            "{err:#}"
        );
        let typo = text.replace("[[model]]", "[[modle]]");
        assert!(PublisherConfig::parse(&typo, Path::new("/")).is_err());
    }
}
