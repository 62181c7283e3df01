//! What a result says about a model's outputs: a summary per tensor (what `memaflow infer`
//! prints), the raw values, a top-k ranking with labels, or the boxes an SSD-style detector
//! head finds (anchors, regression decoding, non-maximum suppression).

use super::preprocess::Geometry;
use super::schema::{
    Detection, Detections, Landmarks, ModelTimes, Outputs, Ranked, RawOutput, Roi, TopOutput,
};
use crate::model::package::OutputSpec;
use crate::runtime::FloatTensor;
use anyhow::{Context, Result, ensure};
use serde::Deserialize;

/// What [`summarise`] makes (defined with the rest of the result schema).
pub use super::schema::OutputSummary;

pub(crate) fn summarise(name: &str, t: &FloatTensor, labels: Option<&[String]>) -> OutputSummary {
    let finite = t.data.iter().copied().filter(|v| v.is_finite());
    let (min, max) = finite
        .clone()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let mean = if t.data.is_empty() {
        0.0
    } else {
        (t.data.iter().map(|&v| v as f64).sum::<f64>() / t.data.len() as f64) as f32
    };
    let is_vector = t.shape.iter().filter(|&&d| d > 1).count() == 1;
    let mut top5 = vec![];
    let mut argmax = None;
    if is_vector {
        let mut order: Vec<usize> = (0..t.data.len()).collect();
        order.sort_by(|&a, &b| t.data[b].total_cmp(&t.data[a]));
        argmax = order.first().copied();
        top5 = order
            .iter()
            .take(5)
            .map(|&i| Ranked {
                index: i,
                value: t.data[i],
                label: labels.and_then(|l| l.get(i).cloned()),
            })
            .collect();
    }
    OutputSummary {
        name: name.to_string(),
        shape: t.shape.clone(),
        min,
        max,
        mean,
        argmax,
        top5,
    }
}

/// How a model's outputs go into a frame's result.
#[derive(Clone, Debug)]
pub enum OutputReport {
    /// Per output: shape, min, max, mean, and for vectors the top 5, as `memaflow infer`.
    Summary,
    /// Per output: shape and every value.
    Raw,
    /// Per output: the k largest values with their indices and labels.
    TopK {
        k: usize,
        /// Labels by index; without them the manifest's labels of that output.
        labels: Option<Vec<String>>,
    },
    /// Detections decoded from a box-regression and a score output.
    Boxes(Box<BoxDecoder>),
    /// Points in a cascade's crop, mapped back into the frame.
    Landmarks(Box<LandmarkSpec>),
}

impl OutputReport {
    pub fn name(&self) -> &'static str {
        match self {
            OutputReport::Summary => "summary",
            OutputReport::Raw => "raw",
            OutputReport::TopK { .. } => "topk",
            OutputReport::Boxes(_) => "boxes",
            OutputReport::Landmarks(_) => "landmarks",
        }
    }

    /// Whether this report can be made from outputs shaped as `specs` says.
    pub fn check(&self, specs: &[OutputSpec]) -> Result<()> {
        match self {
            OutputReport::Boxes(d) => d.check(specs),
            OutputReport::Landmarks(l) => l.check(specs),
            OutputReport::TopK {
                labels: Some(labels),
                ..
            } => {
                ensure!(
                    specs.iter().any(|s| values(s) == labels.len()),
                    "{} labels, but no output has that many values",
                    labels.len()
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The `outputs` of one model in a result; `geometry` maps model-input coordinates
    /// back to the frame's pixels.
    pub(crate) fn render(
        &self,
        specs: &[OutputSpec],
        outputs: &[FloatTensor],
        geometry: &Geometry,
    ) -> Result<Outputs> {
        ensure!(
            specs.len() == outputs.len(),
            "{} outputs for {} declared",
            outputs.len(),
            specs.len()
        );
        let pairs = specs.iter().zip(outputs);
        Ok(match self {
            OutputReport::Summary => Outputs::Summary(
                pairs
                    .map(|(s, t)| summarise(&s.name, t, s.labels.as_deref()))
                    .collect(),
            ),
            OutputReport::Raw => Outputs::Raw(
                pairs
                    .map(|(s, t)| RawOutput {
                        name: s.name.clone(),
                        shape: t.shape.clone(),
                        values: t.data.clone(),
                    })
                    .collect(),
            ),
            OutputReport::TopK { k, labels } => Outputs::Topk(
                pairs
                    .map(|(s, t)| {
                        let labels = labels
                            .as_deref()
                            .filter(|l| l.len() == t.data.len())
                            .or(s.labels.as_deref());
                        TopOutput {
                            name: s.name.clone(),
                            shape: t.shape.clone(),
                            top: top_k(&t.data, *k, labels),
                        }
                    })
                    .collect(),
            ),
            OutputReport::Boxes(d) => Outputs::Boxes(d.decode(specs, outputs, geometry)?),
            OutputReport::Landmarks(_) => {
                anyhow::bail!("a landmarks report is made per crop (LandmarkSpec::decode)")
            }
        })
    }
}

/// A landmark model's outputs as configured (`[model.landmarks]`): points in input
/// pixels, and optionally a presence score.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LandmarkSpec {
    /// Output with the points: N × `dims` values, x and y in the model input's pixels.
    pub points: String,
    /// Values per point: 2 (x, y) or 3 (x, y, z).
    #[serde(default = "three")]
    pub(crate) dims: usize,
    /// Output with one presence score.
    pub presence: Option<String>,
    /// The presence score is a logit (apply the sigmoid).
    #[serde(default)]
    pub(crate) sigmoid: bool,
    /// Presence below this: `present` is false (the points are still reported).
    #[serde(default = "half")]
    pub threshold: f32,
}

fn three() -> usize {
    3
}

/// The index of output `name` among the model's outputs; an error names the report
/// (`what`) and the outputs there are.
fn output_index(specs: &[OutputSpec], what: &str, name: &str) -> Result<usize> {
    specs.iter().position(|s| s.name == name).with_context(|| {
        format!(
            "{what}: the model has no output '{name}' (it has {})",
            specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The number of values output `s` holds.
fn values(s: &OutputSpec) -> usize {
    s.shape.iter().product()
}

/// Fails unless `fits`, naming the report (`what`), output `s` and its shape, then why
/// the shape does not do (`why`).
fn ensure_shape(fits: bool, what: &str, s: &OutputSpec, why: std::fmt::Arguments) -> Result<()> {
    ensure!(fits, "{what} '{}' is {:?}{why}", s.name, s.shape);
    Ok(())
}

impl LandmarkSpec {
    pub fn check(&self, specs: &[OutputSpec]) -> Result<()> {
        ensure!(
            (2..=3).contains(&self.dims),
            "landmarks.dims must be 2 or 3"
        );
        ensure!(
            (0.0..=1.0).contains(&self.threshold),
            "landmarks.threshold is between 0 and 1"
        );
        let p = &specs[output_index(specs, "landmarks", &self.points)?];
        let n = values(p);
        ensure_shape(
            n > 0 && n.is_multiple_of(self.dims),
            "landmarks:",
            p,
            format_args!(", not a whole number of {}-value points", self.dims),
        )?;
        if let Some(presence) = &self.presence {
            let s = &specs[output_index(specs, "landmarks", presence)?];
            ensure_shape(
                values(s) == 1,
                "landmarks: presence",
                s,
                format_args!(", not one score"),
            )?;
        }
        Ok(())
    }

    /// The points of one crop in the frame: input pixels (of a `w`×`h` input) → the
    /// crop's region `roi`. z is scaled as x.
    pub(crate) fn decode(
        &self,
        specs: &[OutputSpec],
        outputs: &[FloatTensor],
        roi: &Roi,
        (w, h): (usize, usize),
        time_ms: ModelTimes,
    ) -> Result<Landmarks> {
        self.check(specs)?;
        ensure!(
            specs.len() == outputs.len(),
            "{} outputs for {} declared",
            outputs.len(),
            specs.len()
        );
        let raw = &outputs[output_index(specs, "landmarks", &self.points)?].data;
        let points = raw
            .chunks_exact(self.dims)
            .map(|p| {
                let [x, y] = roi.to_frame(p[0] / w as f32, p[1] / h as f32);
                let z = p.get(2).map_or(0.0, |z| z / w as f32 * roi.size[0]);
                [x, y, z]
            })
            .collect();
        let presence = match &self.presence {
            Some(name) => {
                let v = outputs[output_index(specs, "landmarks", name)?].data[0];
                Some(if self.sigmoid {
                    1.0 / (1.0 + (-v.clamp(-100.0, 100.0)).exp())
                } else {
                    v
                })
            }
            None => None,
        };
        Ok(Landmarks {
            presence,
            present: presence.is_none_or(|p| p >= self.threshold),
            points,
            time_ms,
        })
    }
}

fn top_k(data: &[f32], k: usize, labels: Option<&[String]>) -> Vec<Ranked> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by(|&a, &b| data[b].total_cmp(&data[a]));
    order
        .into_iter()
        .take(k)
        .map(|i| Ranked {
            index: i,
            value: data[i],
            label: labels.and_then(|l| l.get(i).cloned()),
        })
        .collect()
}

/// An SSD-style detector head as configured (`[model.boxes]`): MediaPipe's anchor layout
/// with fixed-size anchors, centre/size regressions scaled by the input size, keypoints
/// after the box.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoxSpec {
    /// Output with the regressions, [1, anchors, 4 + 2·keypoints].
    pub boxes: String,
    /// Output with one score (logit) per anchor, [1, anchors, 1].
    pub(crate) scores: String,
    /// Model input width and height the regressions are scaled by.
    pub(crate) input_size: [u32; 2],
    /// Stride of each feature map; consecutive equal strides share a grid.
    pub(crate) strides: Vec<u32>,
    #[serde(default = "two")]
    pub(crate) anchors_per_layer: usize,
    #[serde(default = "half")]
    pub(crate) anchor_offset: f32,
    #[serde(default)]
    pub keypoints: usize,
    #[serde(default = "half")]
    pub(crate) score_threshold: f32,
    #[serde(default = "iou")]
    pub(crate) iou_threshold: f32,
    #[serde(default = "hundred")]
    pub(crate) max_boxes: usize,
    /// Scores are logits (apply the sigmoid) rather than probabilities.
    #[serde(default = "yes")]
    pub(crate) sigmoid: bool,
    #[serde(default)]
    pub(crate) nms: Nms,
}

/// How overlapping candidates become one detection.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Nms {
    /// Keep the best, drop what overlaps it.
    #[default]
    Greedy,
    /// Average the best and what overlaps it, weighted by score (MediaPipe's detectors).
    Weighted,
}

fn two() -> usize {
    2
}
fn half() -> f32 {
    0.5
}
fn iou() -> f32 {
    0.3
}
fn hundred() -> usize {
    100
}
fn yes() -> bool {
    true
}

#[derive(Clone, Debug)]
pub struct BoxDecoder {
    pub(crate) spec: BoxSpec,
    /// Anchor centres, normalised to the input.
    anchors: Vec<(f32, f32)>,
}

impl BoxDecoder {
    pub fn new(spec: BoxSpec) -> Result<BoxDecoder> {
        let [w, h] = spec.input_size;
        ensure!(w > 0 && h > 0, "boxes.input_size must be positive");
        ensure!(
            !spec.strides.is_empty() && spec.strides.iter().all(|&s| s > 0),
            "boxes.strides must be positive and not empty"
        );
        ensure!(
            spec.anchors_per_layer > 0,
            "boxes.anchors_per_layer must be positive"
        );
        ensure!(
            (0.0..=1.0).contains(&spec.score_threshold)
                && (0.0..=1.0).contains(&spec.iou_threshold),
            "boxes.score_threshold and boxes.iou_threshold are between 0 and 1"
        );
        let mut anchors = vec![];
        let mut i = 0;
        while i < spec.strides.len() {
            let stride = spec.strides[i];
            let mut layers = 0;
            while i < spec.strides.len() && spec.strides[i] == stride {
                layers += 1;
                i += 1;
            }
            let (fw, fh) = (w.div_ceil(stride), h.div_ceil(stride));
            for y in 0..fh {
                for x in 0..fw {
                    let centre = (
                        (x as f32 + spec.anchor_offset) / fw as f32,
                        (y as f32 + spec.anchor_offset) / fh as f32,
                    );
                    anchors.extend(std::iter::repeat_n(centre, layers * spec.anchors_per_layer));
                }
            }
        }
        Ok(BoxDecoder { spec, anchors })
    }

    pub fn check(&self, specs: &[OutputSpec]) -> Result<()> {
        let n = self.anchors.len();
        let b = &specs[output_index(specs, "boxes", &self.spec.boxes)?];
        let s = &specs[output_index(specs, "boxes", &self.spec.scores)?];
        let per = 4 + 2 * self.spec.keypoints;
        let last = b.shape.last().copied().unwrap_or(0);
        ensure_shape(
            values(b) == n * last && last >= per,
            "boxes:",
            b,
            format_args!("; {n} anchors of at least {per} values expected"),
        )?;
        ensure_shape(
            values(s) == n,
            "boxes:",
            s,
            format_args!("; one score for each of {n} anchors expected"),
        )
    }

    pub(crate) fn decode(
        &self,
        specs: &[OutputSpec],
        outputs: &[FloatTensor],
        geometry: &Geometry,
    ) -> Result<Detections> {
        self.check(specs)?;
        let sp = &self.spec;
        let boxes = &outputs[output_index(specs, "boxes", &sp.boxes)?];
        let scores = &outputs[output_index(specs, "boxes", &sp.scores)?];
        let stride = boxes.shape.last().copied().unwrap_or(0);
        let (sx, sy) = (sp.input_size[0] as f32, sp.input_size[1] as f32);
        let mut found: Vec<Candidate> = vec![];
        for (k, &(ax, ay)) in self.anchors.iter().enumerate() {
            let raw = scores.data[k];
            let score = if sp.sigmoid {
                1.0 / (1.0 + (-raw.clamp(-100.0, 100.0)).exp())
            } else {
                raw
            };
            // NaN scores are no detections.
            if score.is_nan() || score < sp.score_threshold {
                continue;
            }
            let r = &boxes.data[k * stride..(k + 1) * stride];
            let (cx, cy) = (r[0] / sx + ax, r[1] / sy + ay);
            let (w, h) = (r[2] / sx, r[3] / sy);
            let keypoints = (0..sp.keypoints)
                .map(|j| [r[4 + 2 * j] / sx + ax, r[5 + 2 * j] / sy + ay])
                .collect();
            found.push(Candidate {
                score,
                bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
                keypoints,
            });
        }
        let candidates = found.len();
        found.sort_by(|a, b| b.score.total_cmp(&a.score));
        let kept = match sp.nms {
            Nms::Greedy => greedy_nms(found, sp.iou_threshold, sp.max_boxes),
            Nms::Weighted => weighted_nms(found, sp.iou_threshold, sp.max_boxes),
        };
        let detections = kept
            .into_iter()
            .map(|c| {
                let (x0, y0) = geometry.to_frame(c.bbox[0], c.bbox[1]);
                let (x1, y1) = geometry.to_frame(c.bbox[2], c.bbox[3]);
                Detection {
                    score: c.score,
                    bbox: [x0, y0, x1, y1],
                    keypoints: c
                        .keypoints
                        .iter()
                        .map(|p| {
                            let (x, y) = geometry.to_frame(p[0], p[1]);
                            [x, y]
                        })
                        .collect(),
                    crops: vec![],
                }
            })
            .collect();
        Ok(Detections {
            candidates,
            detections,
        })
    }
}

/// A decoded anchor above the score threshold, normalised to the model input.
#[derive(Clone, Debug)]
struct Candidate {
    score: f32,
    bbox: [f32; 4],
    keypoints: Vec<[f32; 2]>,
}

/// Highest score first; a candidate overlapping a kept one by `iou` or more is dropped.
fn greedy_nms(sorted: Vec<Candidate>, iou: f32, max: usize) -> Vec<Candidate> {
    let mut kept: Vec<Candidate> = vec![];
    for c in sorted {
        if kept.len() == max {
            break;
        }
        if kept.iter().all(|k| iou_of(&k.bbox, &c.bbox) < iou) {
            kept.push(c);
        }
    }
    kept
}

/// MediaPipe's `WEIGHTED` suppression: the best candidate and every one overlapping it by
/// more than `iou` become one detection, box and keypoints averaged by score, with the
/// best score.
fn weighted_nms(sorted: Vec<Candidate>, iou: f32, max: usize) -> Vec<Candidate> {
    let mut kept = vec![];
    let mut remaining = sorted;
    while let Some(best) = remaining.first().cloned() {
        if kept.len() == max {
            break;
        }
        let (group, rest): (Vec<Candidate>, Vec<Candidate>) = remaining
            .into_iter()
            .partition(|c| iou_of(&best.bbox, &c.bbox) > iou);
        let total: f32 = group.iter().map(|c| c.score).sum();
        let mut merged = best.clone();
        if total > 0.0 {
            for (i, v) in merged.bbox.iter_mut().enumerate() {
                *v = group.iter().map(|c| c.score * c.bbox[i]).sum::<f32>() / total;
            }
            for (j, p) in merged.keypoints.iter_mut().enumerate() {
                for (i, v) in p.iter_mut().enumerate() {
                    *v = group
                        .iter()
                        .map(|c| c.score * c.keypoints[j][i])
                        .sum::<f32>()
                        / total;
                }
            }
        }
        kept.push(merged);
        remaining = if group.is_empty() {
            // The best has no area (IoU 0 with itself): drop it alone.
            rest.into_iter().skip(1).collect()
        } else {
            rest
        };
    }
    kept
}

fn iou_of(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: Vec<usize>) -> OutputSpec {
        OutputSpec {
            name: name.into(),
            shape,
            dtype: crate::model::graph::DType::F32,
            labels: None,
        }
    }

    fn face_decoder() -> BoxDecoder {
        BoxDecoder::new(BoxSpec {
            boxes: "regressors".into(),
            scores: "classificators".into(),
            input_size: [128, 128],
            strides: vec![8, 16, 16, 16],
            anchors_per_layer: 2,
            anchor_offset: 0.5,
            keypoints: 6,
            score_threshold: 0.5,
            iou_threshold: 0.3,
            max_boxes: 100,
            sigmoid: true,
            nms: Nms::Greedy,
        })
        .unwrap()
    }

    #[test]
    fn mediapipe_face_anchors_and_decoding() {
        let d = face_decoder();
        // 16×16 cells × 2 + 8×8 cells × 6, as MediaPipe's short-range face detector.
        assert_eq!(d.anchors.len(), 896);
        let specs = [
            spec("regressors", vec![1, 896, 16]),
            spec("classificators", vec![1, 896, 1]),
        ];
        let mut boxes = vec![0f32; 896 * 16];
        let mut scores = vec![-10f32; 896];
        // Anchor 0 sits at (0.5/16, 0.5/16); a 32×32 box centred 8 px right of it, and a
        // weaker overlapping one on anchor 1 (same centre) that suppression removes.
        for (k, score) in [(0usize, 3.0f32), (1, 1.0)] {
            boxes[k * 16..k * 16 + 4].copy_from_slice(&[8.0, 0.0, 32.0, 32.0]);
            scores[k] = score;
        }
        let outputs = [
            FloatTensor::new(vec![1, 896, 16], boxes).unwrap(),
            FloatTensor::new(vec![1, 896, 1], scores).unwrap(),
        ];
        let geometry = Geometry::stretch(256, 256);
        let r = d.decode(&specs, &outputs, &geometry).unwrap();
        assert_eq!(r.candidates, 2);
        assert_eq!(r.detections.len(), 1);
        let det = &r.detections[0];
        assert!((det.score - 1.0 / (1.0 + (-3f32).exp())).abs() < 1e-6);
        // Centre at input (4 + 8, 4) px → frame (24, 8) px; 32 input px = 64 frame px.
        let want = [24.0 - 32.0, 8.0 - 32.0, 24.0 + 32.0, 8.0 + 32.0];
        for (a, b) in det.bbox.iter().zip(want) {
            assert!((a - b).abs() < 1e-3, "{:?} vs {want:?}", det.bbox);
        }
        assert_eq!(det.keypoints.len(), 6);
        assert!(d.check(&[spec("regressors", vec![1, 895, 16])]).is_err());
        // Weighted suppression (MediaPipe's): the two become one, averaged by score. The
        // weaker box is 8 px wider on the right: the merged one lies between.
        let mut weighted = d.clone();
        weighted.spec.nms = Nms::Weighted;
        let mut shifted = outputs.clone();
        shifted[0].data[16 + 2] = 40.0;
        let r = weighted.decode(&specs, &shifted, &geometry).unwrap();
        assert_eq!(r.detections.len(), 1);
        let (s0, s1) = (1.0 / (1.0 + (-3f32).exp()), 1.0 / (1.0 + (-1f32).exp()));
        let half_width = (s0 * 32.0 + s1 * 40.0) / (s0 + s1);
        let want = 24.0 + half_width;
        assert!(
            (r.detections[0].bbox[2] - want).abs() < 1e-3,
            "{:?} vs {want}",
            r.detections[0].bbox
        );
        assert_eq!(r.detections[0].score, s0);
    }

    #[test]
    fn reports_render_per_kind() {
        let specs = [spec("prob", vec![1, 3])];
        let outs = [FloatTensor::new(vec![1, 3], vec![0.2, 0.7, 0.1]).unwrap()];
        let g = Geometry::stretch(1, 1);
        let Outputs::Raw(raw) = OutputReport::Raw.render(&specs, &outs, &g).unwrap() else {
            panic!("raw renders raw outputs")
        };
        assert_eq!(raw[0].values[1], 0.7);
        let labels = Some(vec!["a".to_string(), "b".into(), "c".into()]);
        let Outputs::Topk(top) = OutputReport::TopK { k: 2, labels }
            .render(&specs, &outs, &g)
            .unwrap()
        else {
            panic!("topk renders a ranking")
        };
        assert_eq!(top[0].top.len(), 2);
        assert_eq!(top[0].top[0].label.as_deref(), Some("b"));
        let summary = OutputReport::Summary.render(&specs, &outs, &g).unwrap();
        assert_eq!(
            summary,
            Outputs::Summary(vec![summarise("prob", &outs[0], None)])
        );
        assert!(OutputReport::Raw.render(&specs, &[], &g).is_err());
    }

    #[test]
    fn vectors_get_a_ranking_with_labels() {
        let t = FloatTensor::new(vec![1, 3], vec![0.2, 0.7, 0.1]).unwrap();
        let labels = vec!["a".to_string(), "b".into(), "c".into()];
        let s = summarise("prob", &t, Some(&labels));
        assert_eq!(s.argmax, Some(1));
        assert_eq!(s.top5[0].label.as_deref(), Some("b"));
        assert_eq!(s.top5.len(), 3);
        assert!((s.mean - 1.0 / 3.0).abs() < 1e-6);
        let map = FloatTensor::new(vec![1, 2, 2, 1], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!(summarise("m", &map, None).top5.is_empty());
    }
}
