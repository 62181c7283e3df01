//! The schema of the daemon's result files: `out/NAME.json` is a [`FrameResult`],
//! `failed/NAME.error.json` a [`FailureRecord`]. These types are the one definition
//! (`docs/spool.md` shows them as JSON and explains every field); the daemon writes them
//! and `memaflow show`, the demo and the tests read them back through them, never by
//! string key.
//!
//! Coordinates are the frame's pixels: x right, y down, the origin at the top left corner
//! of the top left pixel.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `out/NAME.json`: one frame through every configured model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FrameResult {
    /// The frame's name in the spool (`cam.jpg`, or `cam~1.jpg` after a collision); lossy
    /// where it is not UTF-8, and then `frame_bytes_hex` holds the exact bytes.
    pub frame: String,
    /// The frame's name as bytes, in hex, when it is not UTF-8 (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_bytes_hex: Option<String>,
    /// Size of the frame file.
    pub bytes: u64,
    /// Width of the decoded frame, pixels.
    pub width: u32,
    /// Height of the decoded frame, pixels.
    pub height: u32,
    /// When the result was written, seconds since the Unix epoch.
    pub processed_unix: f64,
    /// In configuration order.
    pub models: Vec<ModelResult>,
    /// Where the frame's time went.
    pub time_ms: FrameTimes,
    /// The memory gate's view of the frame.
    pub memory: FrameMemory,
}

impl FrameResult {
    /// Reads and parses a result file.
    pub fn read(path: &Path) -> Result<FrameResult> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a frame result", path.display()))
    }

    /// The entry of the model named `name`.
    pub fn model(&self, name: &str) -> Option<&ModelResult> {
        self.models.iter().find(|m| m.name == name)
    }
}

/// Milliseconds a frame spent in each stage, from its claim.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct FrameTimes {
    /// Reading and decoding the frame.
    pub decode: f64,
    /// From the submission of its first inference to the end of the last.
    pub inference: f64,
    /// Claim to result.
    pub total: f64,
}

/// Memory while the frame was processed, as the memory gate counted it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct FrameMemory {
    /// The configured budget, if any.
    pub budget_bytes: Option<u64>,
    /// The executor's whole ledger at its highest while the frame's inferences ran.
    pub ledger_high_water_bytes: u64,
    /// The process's peak RSS since start.
    pub peak_rss_bytes: u64,
}

/// One model's entry in a result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelResult {
    /// The package's name (its directory's name when it cannot be opened).
    pub name: String,
    /// What the model produced, or why it produced nothing.
    #[serde(flatten)]
    pub outcome: ModelOutcome,
}

impl ModelResult {
    /// The error, when the model produced no outputs.
    pub fn error(&self) -> Option<&ModelError> {
        match &self.outcome {
            ModelOutcome::Failed { error } => Some(error),
            ModelOutcome::Ran(_) => None,
        }
    }

    /// The outputs, when the model ran.
    pub fn outputs(&self) -> Option<&Outputs> {
        match &self.outcome {
            ModelOutcome::Failed { .. } => None,
            ModelOutcome::Ran(run) => Some(&run.outputs),
        }
    }

    /// The detections, for a model reported as `boxes`.
    pub fn detections(&self) -> Option<&Detections> {
        match self.outputs()? {
            Outputs::Boxes(d) => Some(d),
            _ => None,
        }
    }
}

/// Either why a model produced nothing for the frame, or what it produced.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ModelOutcome {
    /// The model produced nothing: `error` says at which stage and why.
    Failed {
        /// Where and why.
        error: ModelError,
    },
    /// The model ran (boxed: the outputs are far larger than an error).
    Ran(Box<ModelRun>),
}

/// A model that ran on the frame: its outputs as reported, and what running it cost.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelRun {
    /// The outputs, rendered as the model's `report` asks.
    #[serde(flatten)]
    pub outputs: Outputs,
    /// When it ran, relative to the frame's submission; absent for a cascade that had no
    /// detection to run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<ModelTimes>,
    /// How many layers it loaded and found resident (absent for a cascade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<LayerCounts>,
    /// Its share of the ledger (absent for a cascade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ModelMemory>,
}

/// A model's outputs as its report kind (`report`) makes them (`outputs`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "report", content = "outputs", rename_all = "lowercase")]
pub enum Outputs {
    /// `summary`: shape and statistics of each output.
    Summary(Vec<OutputSummary>),
    /// `raw`: every value of each output.
    Raw(Vec<RawOutput>),
    /// `topk`: the largest values of each output, labelled when the package has labels.
    Topk(Vec<TopOutput>),
    /// `boxes`: decoded detections after non-maximum suppression.
    Boxes(Detections),
    /// A cascade: its results are under the source model's detections (`crops`).
    Landmarks(CascadeSummary),
}

/// Inference timing, from the frame's submission; for a cascade, over all its crops.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelTimes {
    /// Milliseconds from the frame's submission to the inference's first task.
    pub start: f64,
    /// Milliseconds from the frame's submission to the inference's last task.
    pub end: f64,
    /// Summed durations of layer loads and execs (on several workers they overlap).
    pub load: f64,
    /// Summed durations of layer execs (on several workers they overlap).
    pub exec: f64,
}

/// Layers of one inference: read from disk, or found resident from an earlier frame.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LayerCounts {
    /// Layers read and planned for this inference.
    pub loaded: u32,
    /// Layers found resident.
    pub resident: u32,
}

/// One model's part of the memory gate's ledger during the frame.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelMemory {
    /// High-water mark of this model's share of the scheduler's ledger.
    pub ledger_high_water_bytes: u64,
}

/// Where a model failed.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelStage {
    /// The start-up check of the package (and of its configuration against it).
    Package,
    /// A cascade's source model produced no detections list for this frame.
    Source,
    /// Turning the frame into the model's input tensor (resize, colours, normalisation).
    Preprocess,
    /// Loading or running a layer (`layer` says which, when one did).
    Inference,
    /// Rendering the outputs as configured.
    Report,
}

/// Why a model (or one crop of a cascade) produced no outputs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelError {
    /// Where it failed.
    pub stage: ModelStage,
    /// The error and its causes, outermost first.
    pub reason: String,
    /// The layer that failed, for an error while loading or running one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
}

/// `summary`: one output summarised, as `memaflow infer` prints it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OutputSummary {
    /// The output tensor's name in the manifest.
    pub name: String,
    /// The output tensor's shape.
    pub shape: Vec<usize>,
    /// Smallest value (NaN reads back from `null`).
    #[serde(deserialize_with = "lenient::f32")]
    pub min: f32,
    /// Largest value.
    #[serde(deserialize_with = "lenient::f32")]
    pub max: f32,
    /// Mean of the values.
    #[serde(deserialize_with = "lenient::f32")]
    pub mean: f32,
    /// For vector outputs (one axis longer than 1): the largest value's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argmax: Option<usize>,
    /// For vector outputs: the five largest values, largest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top5: Vec<Ranked>,
}

/// One of the largest values of an output: where it is, and its label if the package has labels.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Ranked {
    /// Its index in the flattened output.
    pub index: usize,
    /// The value.
    #[serde(deserialize_with = "lenient::f32")]
    pub value: f32,
    /// The package's label for the index, if it has labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// `raw`: every value of one output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RawOutput {
    /// The output tensor's name in the manifest.
    pub name: String,
    /// The output tensor's shape.
    pub shape: Vec<usize>,
    /// Every value, in C order.
    #[serde(deserialize_with = "lenient::vec")]
    pub values: Vec<f32>,
}

/// `topk`: the largest values of one output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TopOutput {
    /// The output tensor's name in the manifest.
    pub name: String,
    /// The output tensor's shape.
    pub shape: Vec<usize>,
    /// The `k` largest values, largest first.
    pub top: Vec<Ranked>,
}

/// `boxes`: what a detector found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Detections {
    /// Anchors whose score passed the threshold, before suppression.
    pub candidates: usize,
    /// What suppression kept, highest score first.
    pub detections: Vec<Detection>,
}

/// One detection, in the frame's pixels.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Detection {
    /// Confidence in 0..1 (after the sigmoid when configured).
    #[serde(deserialize_with = "lenient::f32")]
    pub score: f32,
    /// x_min, y_min, x_max, y_max.
    #[serde(rename = "box", deserialize_with = "lenient::array")]
    pub bbox: [f32; 4],
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "lenient::points"
    )]
    /// The detector's keypoints (x, y), in its order (for a face: eyes, nose, mouth, ears).
    pub keypoints: Vec<[f32; 2]>,
    /// What each cascade fed by this detection found in its crop, in configuration order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crops: Vec<CropResult>,
}

/// A cascade's entry in `models[]`: its per-detection results are under the source's
/// detections.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CascadeSummary {
    /// The model whose detections it ran on.
    pub from: String,
    /// Crops made and run (at most `input.max`).
    pub crops: usize,
    /// Crops whose landmarks passed the presence threshold.
    pub found: usize,
}

/// One cascade model on one detection's crop.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CropResult {
    /// The cascade model's name.
    pub model: String,
    /// The region cropped from the frame; absent when the detection gives none (an empty
    /// or non-finite box: the error says which).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roi: Option<Roi>,
    /// The landmarks found in the crop, or why there are none.
    #[serde(flatten)]
    pub outcome: CropOutcome,
}

/// What one cascade model made of one crop.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum CropOutcome {
    /// No landmarks: `error` says why (no region, a failed inference).
    Failed {
        /// Where and why.
        error: ModelError,
    },
    /// The landmarks, mapped into the frame.
    Ran(Box<Landmarks>),
}

/// A landmark model's output on one crop, mapped back into the frame.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Landmarks {
    /// The model's presence score (after the sigmoid when configured), if it has one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::opt_f32"
    )]
    pub presence: Option<f32>,
    /// Whether the presence score passed the threshold (true without a presence output).
    pub present: bool,
    /// `[x, y, z]` in the frame's pixels; z is depth at the scale of x (the model's z
    /// mapped like x through the crop), relative, larger is farther.
    #[serde(deserialize_with = "lenient::points")]
    pub points: Vec<[f32; 3]>,
    /// When the crop's inference ran, relative to the frame's submission.
    pub time_ms: ModelTimes,
}

/// A rotated rectangle in the frame: centre, size and rotation (radians, clockwise on
/// screen since y points down; 0 is upright).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Roi {
    /// Centre (x, y) in the frame's pixels.
    pub center: [f32; 2],
    /// Width and height along the rectangle's own axes, pixels.
    pub size: [f32; 2],
    /// Clockwise rotation on screen, radians.
    pub rotation: f32,
}

impl Roi {
    /// Where the point at (u, v) of the rectangle (0..1 across and down its own axes)
    /// lies in the frame.
    pub fn to_frame(&self, u: f32, v: f32) -> [f32; 2] {
        let (s, c) = self.rotation.sin_cos();
        let x = (u - 0.5) * self.size[0];
        let y = (v - 0.5) * self.size[1];
        [
            self.center[0] + c * x - s * y,
            self.center[1] + s * x + c * y,
        ]
    }

    /// The four corners, clockwise on screen from the top left.
    pub(crate) fn corners(&self) -> [[f32; 2]; 4] {
        [
            self.to_frame(0.0, 0.0),
            self.to_frame(1.0, 0.0),
            self.to_frame(1.0, 1.0),
            self.to_frame(0.0, 1.0),
        ]
    }
}

/// Where a frame failed as a whole.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FrameStage {
    /// Refused (not a plain file, too large) or unreadable.
    Read,
    /// The file is not an image in a format memaflow decodes, or is damaged.
    Decode,
    /// No model produced outputs.
    Inference,
    /// Processing panicked: a bug.
    Internal,
    /// Processing never finished in `spool.max_attempts` attempts: the daemon stopped
    /// (a crash, a kill, a watchdog restart) each time the frame was in flight.
    Unfinished,
}

impl FrameStage {
    /// The stage as `stage` writes it in a failure record.
    pub fn name(self) -> &'static str {
        match self {
            FrameStage::Read => "read",
            FrameStage::Decode => "decode",
            FrameStage::Inference => "inference",
            FrameStage::Internal => "internal",
            FrameStage::Unfinished => "unfinished",
        }
    }
}

/// `failed/NAME.error.json`: why a frame could not be processed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FailureRecord {
    /// As in a result: lossy where not UTF-8, the exact bytes in `frame_bytes_hex`.
    pub frame: String,
    /// The frame's name as bytes, in hex, when it is not UTF-8 (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_bytes_hex: Option<String>,
    /// Where the frame failed.
    pub stage: FrameStage,
    /// The error and its causes, outermost first.
    pub reason: String,
    /// With `stage = "inference"`: each model's error.
    pub models: Vec<ModelResult>,
    /// With `stage = "unfinished"`: how many times processing was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// When the record was written, seconds since the Unix epoch.
    pub failed_unix: f64,
}

impl FailureRecord {
    /// Reads and parses a failure record.
    pub fn read(path: &Path) -> Result<FailureRecord> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a failure record", path.display()))
    }
}

/// JSON has no NaN or infinity: serde_json writes them as `null`. A model may output
/// them, so wherever a model's number lands in a result, `null` reads back as NaN.
mod lenient {
    use serde::{Deserialize, Deserializer};

    fn or_nan(v: Option<f32>) -> f32 {
        v.unwrap_or(f32::NAN)
    }

    pub fn f32<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Option::<f32>::deserialize(d).map(or_nan)
    }

    pub(crate) fn opt_f32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        // A present `null` is a NaN; an absent field is `None` (`#[serde(default)]`).
        Option::<f32>::deserialize(d).map(|v| Some(or_nan(v)))
    }

    pub(crate) fn vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Vec::<Option<f32>>::deserialize(d).map(|v| v.into_iter().map(or_nan).collect())
    }

    pub(crate) fn array<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[f32; N], D::Error> {
        let v = Vec::<Option<f32>>::deserialize(d)?;
        let n = v.len();
        <[Option<f32>; N]>::try_from(v)
            .map(|a| a.map(or_nan))
            .map_err(|_| serde::de::Error::invalid_length(n, &"a point"))
    }

    pub fn points<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<Vec<[f32; N]>, D::Error> {
        #[derive(Deserialize)]
        struct Point<const N: usize>(#[serde(deserialize_with = "array")] [f32; N]);
        Vec::<Point<N>>::deserialize(d).map(|v| v.into_iter().map(|p| p.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model that ran with `outputs`, for [`sample`].
    fn run(outputs: Outputs) -> ModelOutcome {
        ModelOutcome::Ran(Box::new(ModelRun {
            outputs,
            time_ms: Some(ModelTimes {
                start: 0.5,
                end: 2.25,
                load: 1.0,
                exec: 0.75,
            }),
            layers: Some(LayerCounts {
                loaded: 3,
                resident: 1,
            }),
            memory: Some(ModelMemory {
                ledger_high_water_bytes: 1 << 20,
            }),
        }))
    }

    /// The cascade's landmarks on the detection's crop, for [`sample`].
    fn crop() -> CropResult {
        CropResult {
            model: "landmarks".into(),
            roi: Some(Roi {
                center: [10.0, 20.0],
                size: [30.0, 30.0],
                rotation: 0.25,
            }),
            outcome: CropOutcome::Ran(Box::new(Landmarks {
                presence: Some(0.9),
                present: true,
                points: vec![[1.0, 2.0, -0.5]],
                time_ms: ModelTimes {
                    start: 1.0,
                    end: 2.0,
                    load: 0.0,
                    exec: 1.0,
                },
            })),
        }
    }

    /// A result with one model of each kind that matters: boxes with a crop, a cascade, a
    /// ranking, a failure.
    fn sample() -> FrameResult {
        FrameResult {
            frame: "a.png".into(),
            frame_bytes_hex: None,
            bytes: 10,
            width: 4,
            height: 3,
            processed_unix: 1.5,
            models: vec![
                ModelResult {
                    name: "det".into(),
                    outcome: run(Outputs::Boxes(Detections {
                        candidates: 2,
                        detections: vec![Detection {
                            score: 0.75,
                            bbox: [0.0, 1.0, 2.0, 3.0],
                            keypoints: vec![[1.0, 1.5]],
                            crops: vec![crop()],
                        }],
                    })),
                },
                ModelResult {
                    name: "landmarks".into(),
                    outcome: run(Outputs::Landmarks(CascadeSummary {
                        from: "det".into(),
                        crops: 1,
                        found: 1,
                    })),
                },
                ModelResult {
                    name: "top".into(),
                    outcome: run(Outputs::Topk(vec![TopOutput {
                        name: "prob".into(),
                        shape: vec![1, 3],
                        top: vec![Ranked {
                            index: 1,
                            value: 0.1f32 + 0.2,
                            label: Some("b".into()),
                        }],
                    }])),
                },
                ModelResult {
                    name: "broken".into(),
                    outcome: ModelOutcome::Failed {
                        error: ModelError {
                            stage: ModelStage::Package,
                            reason: "gone".into(),
                            layer: Some(5),
                        },
                    },
                },
            ],
            time_ms: FrameTimes {
                decode: 1.0,
                inference: 2.0,
                total: 3.0,
            },
            memory: FrameMemory {
                budget_bytes: None,
                ledger_high_water_bytes: 7,
                peak_rss_bytes: 8,
            },
        }
    }

    #[test]
    fn a_result_reads_back_as_itself() {
        let result = sample();
        let text = serde_json::to_string_pretty(&result).unwrap();
        let back: FrameResult = serde_json::from_str(&text).unwrap();
        assert_eq!(back, result);
        // The JSON is the documented shape.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["models"][0]["report"], "boxes");
        assert_eq!(v["models"][0]["outputs"]["detections"][0]["box"][3], 3.0);
        assert_eq!(
            v["models"][0]["outputs"]["detections"][0]["crops"][0]["points"][0][2],
            -0.5
        );
        assert_eq!(v["models"][3]["error"]["layer"], 5);
        assert!(v["models"][3].get("report").is_none());
        // NaN (written as null) reads back as NaN.
        let mut nan = result.clone();
        let ModelOutcome::Ran(run) = &mut nan.models[0].outcome else {
            unreachable!()
        };
        let Outputs::Boxes(d) = &mut run.outputs else {
            unreachable!()
        };
        d.detections[0].bbox[1] = f32::NAN;
        d.detections[0].keypoints[0][0] = f32::INFINITY;
        let back: FrameResult =
            serde_json::from_str(&serde_json::to_string(&nan).unwrap()).unwrap();
        let det = &back.models[0].detections().unwrap().detections[0];
        assert!(det.bbox[1].is_nan() && det.keypoints[0][0].is_nan());
        assert_eq!(det.bbox[2], 2.0);
        // A misspelt report kind is refused, not taken for a failure.
        let bad = text.replace("\"topk\"", "\"topq\"");
        assert!(serde_json::from_str::<FrameResult>(&bad).is_err());
    }

    #[test]
    fn roi_maps_its_corners() {
        let r = Roi {
            center: [10.0, 10.0],
            size: [4.0, 2.0],
            rotation: std::f32::consts::FRAC_PI_2,
        };
        // A quarter turn clockwise on screen: the rectangle's x axis points down.
        let [x, y] = r.to_frame(1.0, 0.5);
        assert!(
            (x - 10.0).abs() < 1e-5 && (y - 12.0).abs() < 1e-5,
            "{x} {y}"
        );
        let [x, y] = r.to_frame(0.5, 0.0);
        assert!(
            (x - 11.0).abs() < 1e-5 && (y - 10.0).abs() < 1e-5,
            "{x} {y}"
        );
    }
}
