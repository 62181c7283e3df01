//! Model packages on disk: `model.toml` and one TFLite file per layer under `layers/`.
//!
//! The manifest is checked when a package is opened — file names stay inside the package,
//! every layer input is produced by an earlier layer or is a model input — so a scheduler
//! can plan from it without reading a single layer file. Each layer file is checked against
//! its manifest entry when it is read.

use super::graph::*;
use super::split::{LayerKind, LayerPlan, extract_layer, plan_layers, stitch};
use super::tflite::{WriteOptions, read_graph_shared, write_graph};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use xxhash_rust::xxh3::xxh3_128;

pub(crate) const MANIFEST_FILE: &str = "model.toml";
/// Format 2 added each layer file's SHA-256 (`layers[].sha256`).
pub(crate) const FORMAT_VERSION: u32 = 2;

/// `model.toml`: what a package holds, checked when it is opened (names, shapes, byte
/// counts and the layers' wiring must agree) so that nothing downstream re-checks it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The package format; an older one is refused as [`OutdatedFormat`].
    pub format: u32,
    /// The model's name (results and logs use it).
    pub name: String,
    /// The imported file, when the package came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// How a frame becomes the input tensor.
    pub preprocess: Preprocess,
    /// Rewrites applied at import, by kind, with counts.
    #[serde(default)]
    pub normalisation: BTreeMap<String, usize>,
    /// The model's inputs (one is supported by the runtime).
    pub inputs: Vec<TensorSpec>,
    /// The model's outputs, in the order results list them.
    pub outputs: Vec<OutputSpec>,
    /// The layers, in execution order.
    pub layers: Vec<LayerEntry>,
}

/// The TFLite file a package was imported from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Its file name.
    pub file: String,
    /// Its size.
    pub bytes: u64,
}

/// A model input.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// The tensor's name in the model.
    pub name: String,
    /// Its shape (NHWC for images).
    pub shape: Vec<usize>,
    /// Its element type (f32: other inputs are refused at import).
    pub dtype: DType,
}

/// A model output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The tensor's name in the model.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its element type.
    pub dtype: DType,
    /// Class names, one per element of a vector output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

/// How a frame becomes the input tensor: resize to the input's H×W, order channels, then
/// `(pixel - mean[c]) / std[c]` with pixels in 0..=255.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// How the frame is fitted to the input's H×W.
    pub resize: ResizeMode,
    /// Channel order (or grey) the model expects.
    pub color: ColorOrder,
    /// Subtracted per channel (one value: every channel).
    pub mean: Vec<f32>,
    /// Divided by per channel, after the mean (one value: every channel).
    pub std: Vec<f32>,
}

impl Default for Preprocess {
    /// Pixels to [0, 1] in RGB, the convention of most published TFLite vision models.
    fn default() -> Self {
        Preprocess {
            resize: ResizeMode::Stretch,
            color: ColorOrder::Rgb,
            mean: vec![0.0],
            std: vec![255.0],
        }
    }
}

/// How a frame is fitted to a model's input size.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum ResizeMode {
    /// Scale both axes to the input size, ignoring aspect ratio.
    Stretch,
    /// Cut the largest centred region of the input's aspect ratio, then scale.
    Crop,
    /// Scale to fit inside, pad the rest with zeros (MediaPipe's detectors expect this).
    Letterbox,
}

/// The channel order a model expects.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum ColorOrder {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red (Caffe's convention).
    Bgr,
    /// One channel, the luma of the frame.
    Gray,
}

/// One layer of a package: its file, what it costs and which tensors it reads and writes.
/// Byte counts and FLOPs are computed at import, not trusted from elsewhere.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    /// Its position in execution order.
    pub index: usize,
    /// What its weighted op is (scheduling and estimates depend on it).
    pub kind: LayerKind,
    /// The layer file, relative to the package (`layers/NAME.tflite`).
    pub file: String,
    /// The layer file's size.
    pub file_bytes: u64,
    /// Digest of the layer file, checked on every read: a flipped bit or an edited file
    /// fails the layer instead of running with wrong weights.
    pub sha256: Sha256,
    /// Bytes of its constants.
    pub weight_bytes: u64,
    /// Floating-point operations of one run.
    pub flops: u64,
    /// The TFLite ops in the layer, in order.
    pub ops: Vec<String>,
    /// Tensors it reads from earlier layers or the model's input.
    pub inputs: Vec<TensorRef>,
    /// Tensors later layers or the caller read.
    pub outputs: Vec<TensorRef>,
}

/// A tensor crossing a layer boundary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorRef {
    /// Its name, unique in the package.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Bytes of its values.
    pub bytes: u64,
}

/// A SHA-256 digest, written in manifests as 64 lowercase hex digits (as `sha256sum`
/// prints it, so a layer file can be checked by hand).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Sha256 {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(bytes).into())
    }
}

impl std::fmt::Display for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl std::str::FromStr for Sha256 {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Sha256> {
        let digit = |c: u8| (c as char).to_digit(16).filter(|_| !c.is_ascii_uppercase());
        let b = s.as_bytes();
        ensure!(
            b.len() == 64 && b.iter().all(|&c| digit(c).is_some()),
            "'{s}' is not a SHA-256 digest (64 lowercase hex digits)"
        );
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks(2).enumerate() {
            out[i] = (digit(pair[0]).unwrap_or(0) * 16 + digit(pair[1]).unwrap_or(0)) as u8;
        }
        Ok(Sha256(out))
    }
}

impl Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Sha256, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl LayerEntry {
    pub(crate) fn input_bytes(&self) -> u64 {
        self.inputs.iter().map(|t| t.bytes).sum()
    }
    pub(crate) fn output_bytes(&self) -> u64 {
        self.outputs.iter().map(|t| t.bytes).sum()
    }
}

impl Manifest {
    /// Bytes of every layer's constants.
    pub fn weight_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.weight_bytes).sum()
    }
    /// Bytes of every layer file.
    pub fn file_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.file_bytes).sum()
    }
    /// Floating-point operations of one inference.
    pub fn flops(&self) -> u64 {
        self.layers.iter().map(|l| l.flops).sum()
    }

    /// For each tensor crossing a layer boundary, the last layer that reads it.
    pub(crate) fn last_reader(&self) -> HashMap<&str, usize> {
        let mut last = HashMap::new();
        for l in &self.layers {
            for t in &l.inputs {
                last.insert(t.name.as_str(), l.index);
            }
        }
        last
    }

    fn check(&self) -> Result<()> {
        ensure!(
            self.format == FORMAT_VERSION,
            "package format {} is not supported (this memaflow reads format {FORMAT_VERSION})",
            self.format
        );
        ensure!(!self.name.trim().is_empty(), "the package has no name");
        ensure!(!self.layers.is_empty(), "the package has no layers");
        ensure!(
            !self.inputs.is_empty() && !self.outputs.is_empty(),
            "the package declares no inputs or no outputs"
        );
        let channels = self.inputs[0].shape.last().copied().unwrap_or(0);
        let p = &self.preprocess;
        ensure!(
            p.mean.len() == p.std.len() && (p.mean.len() == 1 || p.mean.len() == channels),
            "preprocess mean/std have {} and {} values for {} channels",
            p.mean.len(),
            p.std.len(),
            channels
        );
        ensure!(
            p.std.iter().all(|s| s.is_finite() && *s != 0.0),
            "preprocess std must be finite and non-zero"
        );
        let mut available: HashMap<&str, &[usize]> = self
            .inputs
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        for (pos, l) in self.layers.iter().enumerate() {
            ensure!(l.index == pos, "layer entry {pos} says index {}", l.index);
            check_file_name(&l.file).with_context(|| format!("layer {pos}"))?;
            for t in &l.inputs {
                let have = available.get(t.name.as_str()).with_context(|| {
                    format!(
                        "layer {pos} reads '{}', which no earlier layer produces",
                        t.name
                    )
                })?;
                ensure!(
                    *have == t.shape.as_slice(),
                    "layer {pos} reads '{}' as {:?}, produced as {:?}",
                    t.name,
                    t.shape,
                    have
                );
                ensure!(
                    t.bytes == 4 * t.shape.iter().product::<usize>() as u64,
                    "layer {pos}: '{}' byte count",
                    t.name
                );
            }
            for t in &l.outputs {
                ensure!(
                    available
                        .insert(t.name.as_str(), t.shape.as_slice())
                        .is_none(),
                    "layer {pos} produces '{}' again",
                    t.name
                );
            }
        }
        for o in &self.outputs {
            let have = available
                .get(o.name.as_str())
                .with_context(|| format!("output '{}' is produced by no layer", o.name))?;
            ensure!(
                *have == o.shape.as_slice(),
                "output '{}' is {:?}, produced as {:?}",
                o.name,
                o.shape,
                have
            );
            if let Some(labels) = &o.labels {
                let n: usize = o.shape.iter().product();
                ensure!(
                    labels.len() == n,
                    "output '{}' has {} labels for {} values",
                    o.name,
                    labels.len(),
                    n
                );
            }
        }
        Ok(())
    }
}

/// A package of a format older than this memaflow reads: it must be imported again. A
/// type of its own so that a cache of generated packages (the bench's, the demo's) can
/// tell it from a damaged one and regenerate only this.
#[derive(Debug)]
pub struct OutdatedFormat {
    /// The format the package declares.
    pub format: u32,
}

impl std::fmt::Display for OutdatedFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "package format {} has no layer digests, so a damaged or changed layer file \
             would run unnoticed; re-import the model (memaflow import) or regenerate it \
             (memaflow zoo)",
            self.format
        )
    }
}

impl std::error::Error for OutdatedFormat {}

impl OutdatedFormat {
    /// Whether `err`, or an error it wraps, is an outdated package format.
    pub fn is_cause_of(err: &anyhow::Error) -> bool {
        err.chain().any(|e| e.is::<OutdatedFormat>())
    }
}

/// The format is read before the rest so that an older package is refused for what it is,
/// not for a missing field. Format 1 predates layer digests: refused rather than run
/// unchecked, since a flipped bit in its weights would go unnoticed.
fn check_format(text: &str) -> Result<()> {
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let Ok(Format { format }) = toml::from_str::<Format>(text) else {
        return Ok(()); // the full parse names what is wrong
    };
    if (1..FORMAT_VERSION).contains(&format) {
        return Err(OutdatedFormat { format }.into());
    }
    Ok(())
}

/// Layer file names are plain names under `layers/`: a manifest never points elsewhere.
fn check_file_name(file: &str) -> Result<()> {
    let p = Path::new(file);
    let mut parts = p.components();
    let ok = matches!(parts.next(), Some(std::path::Component::Normal(d)) if d == "layers")
        && matches!(parts.next(), Some(std::path::Component::Normal(_)))
        && parts.next().is_none()
        && file.ends_with(".tflite");
    ensure!(
        ok,
        "layer file '{file}' is not of the form layers/NAME.tflite"
    );
    Ok(())
}

/// An opened, checked package.
#[derive(Clone, Debug)]
pub struct Package {
    /// The package's directory.
    pub dir: PathBuf,
    /// Its checked manifest.
    pub manifest: Manifest,
    /// Per layer, once its file passed the SHA-256 check: the XXH3-128 of those bytes, which
    /// later reads compare instead (see `read_layer_bytes`).
    verified: Vec<OnceLock<u128>>,
}

impl Package {
    /// Opens a package: reads and checks its manifest (not the layer files: each is
    /// checked when read, see [`Package::read_layer`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Package> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(MANIFEST_FILE);
        let text = read_limited(&path, 16 << 20)
            .with_context(|| format!("{}: not a model package", dir.display()))?;
        check_format(&text).with_context(|| format!("{}", path.display()))?;
        let manifest: Manifest =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        manifest
            .check()
            .with_context(|| format!("{}", path.display()))?;
        let verified = (0..manifest.layers.len())
            .map(|_| OnceLock::new())
            .collect();
        Ok(Package {
            dir,
            manifest,
            verified,
        })
    }

    /// The model's name, from the manifest.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// The file of layer `index`.
    pub fn layer_path(&self, index: usize) -> PathBuf {
        self.dir.join(&self.manifest.layers[index].file)
    }

    /// Reads one layer file and checks it is what the manifest says: same size and SHA-256,
    /// same inputs and outputs, only ops the runtime runs. Returns the bytes for tract.
    /// Every reader of layer files (start-up checks, loads, whole-model and tiled runs)
    /// comes through here, reloads through `read_layer_bytes`, so none runs a damaged file.
    pub fn read_layer(&self, index: usize) -> Result<(bytes::Bytes, Graph)> {
        let bytes = self.read_layer_bytes(index)?;
        let entry = &self.manifest.layers[index];
        let path = self.layer_path(index);
        let ctx = || format!("{}: layer {index} ({})", self.name(), path.display());
        let graph = read_graph_shared(&bytes).with_context(ctx)?;
        let names = |ids: &[TensorId]| {
            ids.iter()
                .map(|&t| {
                    (
                        graph.tensors[t].name.clone(),
                        graph.tensors[t].shape.clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let want = |refs: &[TensorRef]| {
            refs.iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect::<Vec<_>>()
        };
        ensure!(
            names(&graph.inputs) == want(&entry.inputs),
            "{}: inputs differ from the manifest",
            ctx()
        );
        ensure!(
            names(&graph.outputs) == want(&entry.outputs),
            "{}: outputs differ from the manifest",
            ctx()
        );
        graph.check_shapes().with_context(ctx)?;
        super::normalise::check_runnable(&graph).with_context(ctx)?;
        Ok((bytes, graph))
    }

    /// Reads one layer file and checks its size and SHA-256 against the manifest, without
    /// parsing it: for a reload through a plan template, made from the same bytes when
    /// `read_layer` checked them in full (the digest says they are still those bytes).
    ///
    /// SHA-256 runs on a layer's first read; its bytes' XXH3-128 is kept and later reads
    /// compare that instead, at memory speed: a reload of a layer the cache evicted pays
    /// the hash every frame, and the boards' cores have no SHA instructions (the costs:
    /// docs/model-packages.md, "Integrity"). Bytes whose XXH3 differs are checked against
    /// the manifest's SHA-256 again, so a damaged file fails as on its first read.
    pub(crate) fn read_layer_bytes(&self, index: usize) -> Result<bytes::Bytes> {
        let entry = self
            .manifest
            .layers
            .get(index)
            .with_context(|| format!("{}: no layer {index}", self.name()))?;
        let path = self.layer_path(index);
        let ctx = || format!("{}: layer {index} ({})", self.name(), path.display());
        let bytes =
            bytes::Bytes::from(read_limited_bytes(&path, entry.file_bytes).with_context(ctx)?);
        ensure!(
            bytes.len() as u64 == entry.file_bytes,
            "{}: {} bytes on disk, the manifest says {}",
            ctx(),
            bytes.len(),
            entry.file_bytes
        );
        let fast = xxh3_128(&bytes);
        if self.verified[index].get() == Some(&fast) {
            return Ok(bytes);
        }
        let digest = Sha256::of(&bytes);
        ensure!(
            digest == entry.sha256,
            "{}: SHA-256 {digest} differs from the manifest's {}: the file is damaged or was \
             changed; re-import the package",
            ctx(),
            entry.sha256
        );
        // Set once: bytes matching the manifest's SHA-256 have one XXH3.
        let _ = self.verified[index].set(fast);
        Ok(bytes)
    }

    /// The whole normalised model, rebuilt from the layer files.
    pub fn whole_graph(&self) -> Result<Graph> {
        let layers = (0..self.manifest.layers.len())
            .map(|i| self.read_layer(i).map(|(_, g)| g))
            .collect::<Result<Vec<_>>>()?;
        let names = |v: &[String]| v.to_vec();
        let inputs: Vec<String> = self
            .manifest
            .inputs
            .iter()
            .map(|t| t.name.clone())
            .collect();
        let outputs: Vec<String> = self
            .manifest
            .outputs
            .iter()
            .map(|t| t.name.clone())
            .collect();
        stitch(&layers, &names(&inputs), &names(&outputs))
            .with_context(|| format!("{}: joining layers", self.name()))
    }
}

fn read_limited(path: &Path, limit: u64) -> Result<String> {
    let bytes = read_limited_bytes(path, limit)?;
    String::from_utf8(bytes).context("not UTF-8 text")
}

/// Reads a regular file of at most `limit` bytes; anything else is an error, not an
/// allocation the size of whatever the file claims to be.
pub(crate) fn read_limited_bytes(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata()?;
    ensure!(meta.is_file(), "{} is not a regular file", path.display());
    ensure!(
        meta.len() <= limit,
        "{} is {} bytes, more than the {} expected",
        path.display(),
        meta.len(),
        limit
    );
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// What a package says about itself beyond the graph.
#[derive(Clone, Debug)]
pub(crate) struct PackageMeta {
    pub name: String,
    pub source: Option<Source>,
    pub preprocess: Preprocess,
    /// Labels by output name.
    pub labels: HashMap<String, Vec<String>>,
    pub normalisation: BTreeMap<String, usize>,
}

/// Splits a normalised graph and writes the package to `dir`, atomically: the package is
/// built beside it and renamed into place, so `dir` is either absent, the old package, or
/// the complete new one.
pub(crate) fn write_package(
    graph: &Graph,
    meta: &PackageMeta,
    dir: &Path,
    replace: bool,
) -> Result<Manifest> {
    ensure!(
        graph.inputs.len() == 1,
        "the model has {} inputs; packages hold single-input vision models",
        graph.inputs.len()
    );
    if dir.exists() {
        ensure!(
            replace,
            "{} already exists (use --force to replace it)",
            dir.display()
        );
        ensure!(
            dir.join(MANIFEST_FILE).exists() || is_empty_dir(dir),
            "{} exists and is not a model package; refusing to replace it",
            dir.display()
        );
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let file_name = dir
        .file_name()
        .context("package path has no final component")?
        .to_string_lossy()
        .to_string();
    let staging = parent.join(format!(".{file_name}.partial-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let result = write_into(graph, meta, &staging);
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if dir.exists() {
        let old = parent.join(format!(".{file_name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old)?;
        std::fs::rename(&staging, dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&staging, dir)
            .with_context(|| format!("moving the package into {}", dir.display()))?;
    }
    Ok(manifest)
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

fn write_into(graph: &Graph, meta: &PackageMeta, dir: &Path) -> Result<Manifest> {
    std::fs::create_dir_all(dir.join("layers"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let plans = plan_layers(graph);
    let width = plans.len().to_string().len().max(3);
    let mut layers = vec![];
    for (index, plan) in plans.iter().enumerate() {
        let file = format!("layers/{index:0width$}.tflite");
        let sub = extract_layer(graph, plan);
        let bytes = write_graph(&sub, WriteOptions::default())?;
        std::fs::write(dir.join(&file), &bytes).with_context(|| format!("writing {file}"))?;
        layers.push(layer_entry(graph, plan, index, file, &bytes));
    }
    let spec = |t: TensorId| TensorSpec {
        name: graph.tensors[t].name.clone(),
        shape: graph.tensors[t].shape.clone(),
        dtype: graph.tensors[t].dtype,
    };
    let manifest = Manifest {
        format: FORMAT_VERSION,
        name: meta.name.clone(),
        source: meta.source.clone(),
        preprocess: meta.preprocess.clone(),
        normalisation: meta.normalisation.clone(),
        inputs: graph.inputs.iter().map(|&t| spec(t)).collect(),
        outputs: graph
            .outputs
            .iter()
            .map(|&t| {
                let s = spec(t);
                OutputSpec {
                    labels: meta.labels.get(&s.name).cloned(),
                    name: s.name,
                    shape: s.shape,
                    dtype: s.dtype,
                }
            })
            .collect(),
        layers,
    };
    manifest
        .check()
        .context("the manifest just built is inconsistent")?;
    let text = toml::to_string(&manifest).context("serialising the manifest")?;
    std::fs::write(dir.join(MANIFEST_FILE), text)?;
    Ok(manifest)
}

fn layer_entry(
    graph: &Graph,
    plan: &LayerPlan,
    index: usize,
    file: String,
    bytes: &[u8],
) -> LayerEntry {
    let nodes = &graph.nodes[plan.nodes.clone()];
    let tref = |t: TensorId| TensorRef {
        name: graph.tensors[t].name.clone(),
        shape: graph.tensors[t].shape.clone(),
        bytes: graph.tensors[t].bytes() as u64,
    };
    let mut consts: Vec<TensorId> = nodes
        .iter()
        .flat_map(|n| n.inputs.iter().copied())
        .filter(|&t| graph.tensors[t].is_const())
        .collect();
    consts.sort_unstable();
    consts.dedup();
    LayerEntry {
        index,
        kind: plan.kind,
        file,
        file_bytes: bytes.len() as u64,
        sha256: Sha256::of(bytes),
        weight_bytes: consts
            .iter()
            .map(|&t| graph.tensors[t].bytes() as u64)
            .sum(),
        flops: nodes.iter().map(|n| graph.flops(n)).sum(),
        ops: nodes.iter().map(|n| n.op.name().to_string()).collect(),
        inputs: plan.inputs.iter().map(|&t| tref(t)).collect(),
        outputs: plan.outputs.iter().map(|&t| tref(t)).collect(),
    }
}

/// Reads labels from a text file, one per line.
pub(crate) fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = read_limited(path, 4 << 20)?;
    let labels: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if labels.is_empty() {
        bail!("{} holds no labels", path.display());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_vectors_and_reads_back() {
        // FIPS 180-2's examples: "abc" and the empty message.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(Sha256::of(b"abc").to_string(), abc);
        assert_eq!(
            Sha256::of(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(abc.parse::<Sha256>().unwrap(), Sha256::of(b"abc"));
        for bad in [&abc[1..], &abc.to_uppercase(), &abc.replace('b', "g"), ""] {
            assert!(bad.parse::<Sha256>().is_err(), "{bad}");
        }
    }

    #[test]
    fn format_1_is_outdated_and_other_formats_are_left_to_the_full_check() {
        let err = check_format("format = 1\nname = \"x\"\n").unwrap_err();
        assert!(OutdatedFormat::is_cause_of(&err), "{err}");
        assert!(err.to_string().contains("re-import"), "{err}");
        assert!(check_format("format = 2\n").is_ok());
        assert!(check_format("format = 3\n").is_ok()); // refused by Manifest::check
        assert!(check_format("name = [").is_ok()); // the full parse says why
    }
}
