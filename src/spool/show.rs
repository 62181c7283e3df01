//! `memaflow show`: a result drawn on its frame, to see what a pipeline found. Each
//! detector's boxes (green) and keypoints (red, larger dots), each cascade's crop region
//! (yellow, a rotated rectangle) and landmarks (cyan dots). Plain pixel drawing with the
//! `image` crate the daemon already decodes with: no further dependency.

use super::schema::{CropOutcome, FrameResult, Outputs, Roi};
use anyhow::{Context, Result, ensure};
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};

const BOX: Rgb<u8> = Rgb([0, 230, 0]);
const KEYPOINT: Rgb<u8> = Rgb([255, 40, 40]);
const REGION: Rgb<u8> = Rgb([255, 220, 0]);
const LANDMARK: Rgb<u8> = Rgb([0, 220, 255]);

/// What was drawn.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drawn {
    /// Detection boxes.
    pub boxes: usize,
    /// Cascade crop regions.
    pub regions: usize,
    /// Landmark points.
    pub landmarks: usize,
}

/// Where the frame of a result in `out/` is once processed: `done/NAME` beside `out/`.
pub(crate) fn default_frame(result_path: &Path, result: &FrameResult) -> PathBuf {
    let spool = result_path
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    spool.join("done").join(&result.frame)
}

/// Draws the result `result_path` on its frame (`frame`, else `done/NAME` of its spool)
/// and writes the picture to `out` (PNG, or any format its extension names).
pub fn show(result_path: &Path, frame: Option<&Path>, out: &Path) -> Result<Drawn> {
    let result = FrameResult::read(result_path)?;
    let frame = frame.map_or_else(|| default_frame(result_path, &result), Path::to_path_buf);
    let mut img = super::preprocess::decode_file(&frame)
        .with_context(|| {
            format!(
                "reading the frame (give it with --frame if it is not {})",
                frame.display()
            )
        })?
        .into_rgb8();
    ensure!(
        img.dimensions() == (result.width, result.height),
        "{} is {}×{}, the result is of a {}×{} frame",
        frame.display(),
        img.width(),
        img.height(),
        result.width,
        result.height
    );
    let drawn = draw(&mut img, &result);
    img.save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(drawn)
}

/// Draws every model's findings on `img`.
pub(crate) fn draw(img: &mut RgbImage, result: &FrameResult) -> Drawn {
    // Lines and dots scale with the picture, so that they show on a 4K frame too. A
    // landmark is a disc of radius 2 at least (one pixel would not show on a 512×512
    // frame); a keypoint one pixel larger, drawn last so that landmarks do not hide it.
    let side = img.width().min(img.height());
    let width = (side / 300).max(1) as i64;
    let radius = (side / 256).max(2) as i64;
    let mut drawn = Drawn::default();
    for m in &result.models {
        let Some(Outputs::Boxes(d)) = m.outputs() else {
            continue;
        };
        for det in &d.detections {
            let [x0, y0, x1, y1] = det.bbox;
            polygon(img, &[[x0, y0], [x1, y0], [x1, y1], [x0, y1]], BOX, width);
            drawn.boxes += 1;
            for c in &det.crops {
                if let Some(roi) = &c.roi {
                    region(img, roi, width);
                    drawn.regions += 1;
                }
                if let CropOutcome::Ran(l) = &c.outcome {
                    for p in &l.points {
                        dot(img, p[0], p[1], radius, LANDMARK);
                    }
                    drawn.landmarks += l.points.len();
                }
            }
            for &[x, y] in &det.keypoints {
                dot(img, x, y, radius + 1, KEYPOINT);
            }
        }
    }
    drawn
}

fn region(img: &mut RgbImage, roi: &Roi, width: i64) {
    polygon(img, &roi.corners(), REGION, width);
}

fn polygon(img: &mut RgbImage, corners: &[[f32; 2]], color: Rgb<u8>, width: i64) {
    for (k, a) in corners.iter().enumerate() {
        let b = corners[(k + 1) % corners.len()];
        line(img, *a, b, color, width);
    }
}

/// A line `width` pixels wide, as dots every half pixel along it.
fn line(img: &mut RgbImage, a: [f32; 2], b: [f32; 2], color: Rgb<u8>, width: i64) {
    if !a.iter().chain(&b).all(|v| v.is_finite()) {
        return;
    }
    let length = ((b[0] - a[0]).powi(2) + (b[1] - a[1]).powi(2)).sqrt();
    // Bounded: a line far outside a frame is clipped pixel by pixel, not drawn forever.
    let steps = ((length * 2.0).ceil() as usize).clamp(1, 1 << 16);
    for i in 0..=steps {
        let t = i as f32 / steps as f32;
        let (x, y) = (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]));
        dot(img, x, y, (width - 1) / 2, color);
    }
}

/// A filled disc of radius `r` around the pixel of (x, y): the pixels whose squared
/// distance from it is at most r² + r (a 3×3 square for r = 1, a single pixel for 0);
/// what falls outside the frame is dropped.
fn dot(img: &mut RgbImage, x: f32, y: f32, r: i64, color: Rgb<u8>) {
    let reach = r as f32 + 1.0;
    let near = |v: f32, size: u32| v.is_finite() && v > -reach && v < size as f32 + reach;
    if !(near(x, img.width()) && near(y, img.height())) {
        return;
    }
    let (cx, cy) = (x.floor() as i64, y.floor() as i64);
    // Only the part of the disc's square inside the frame.
    let (w, h) = (img.width() as i64, img.height() as i64);
    for py in (cy - r).max(0)..=(cy + r).min(h - 1) {
        for px in (cx - r).max(0)..=(cx + r).min(w - 1) {
            if (px - cx).pow(2) + (py - cy).pow(2) <= r * r + r {
                img.put_pixel(px as u32, py as u32, color);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_dots_stay_in_the_frame() {
        let mut img = RgbImage::new(10, 10);
        line(&mut img, [-5.0, 5.0], [50.0, 5.0], BOX, 1);
        assert!((0..10).all(|x| *img.get_pixel(x, 5) == BOX));
        assert_eq!(*img.get_pixel(0, 4), Rgb([0, 0, 0]));
        line(&mut img, [f32::NAN, 0.0], [1e30, 0.0], BOX, 3);
        dot(&mut img, -100.0, 3.0, 2, KEYPOINT);
        dot(&mut img, 9.5, 9.5, 1, KEYPOINT);
        assert_eq!(*img.get_pixel(9, 9), KEYPOINT);
    }

    /// A 64×64 result: one detection (box 8..56) with `keypoints`, and a cascade's crop
    /// with landmarks `points`.
    fn result(points: &[[f32; 3]], keypoints: &[[f32; 2]]) -> FrameResult {
        let times = serde_json::json!({ "start": 0.0, "end": 1.0, "load": 0.0, "exec": 1.0 });
        serde_json::from_value(serde_json::json!({
            "frame": "a.png", "bytes": 1, "width": 64, "height": 64, "processed_unix": 0.0,
            "models": [{ "name": "det", "report": "boxes", "outputs": {
                "candidates": 1,
                "detections": [{
                    "score": 0.9, "box": [8.0, 8.0, 56.0, 56.0], "keypoints": keypoints,
                    "crops": [{ "model": "marks", "present": true, "points": points,
                                "time_ms": times }],
                }],
            }}],
            "time_ms": { "decode": 0.0, "inference": 0.0, "total": 0.0 },
            "memory": { "budget_bytes": null, "ledger_high_water_bytes": 0, "peak_rss_bytes": 0 },
        }))
        .unwrap()
    }

    #[test]
    fn landmarks_and_keypoints_are_dots_that_show() {
        let frame = RgbImage::from_pixel(64, 64, Rgb([40, 40, 40]));
        let mut img = frame.clone();
        let points = [
            [20.5, 30.5, 0.0],
            [40.0, 40.0, 0.0],
            // Outside the frame, partly or wholly, or not a number: clipped, no panic.
            [63.9, 0.2, 0.0],
            [-1.0, 30.0, 0.0],
            [1e30, -1e30, 0.0],
            [f32::NAN, 10.0, 0.0],
        ];
        let drawn = draw(&mut img, &result(&points, &[[40.0, 40.0], [-3.0, 64.0]]));
        assert_eq!((drawn.boxes, drawn.landmarks), (1, 6));
        // A landmark covers more than its own pixel: a disc of radius 2 (on a frame under
        // 512 pixels), not reaching 3 pixels away.
        for (x, y) in [(20, 30), (22, 30), (20, 28), (21, 31), (19, 32)] {
            assert_eq!(*img.get_pixel(x, y), LANDMARK, "({x}, {y})");
        }
        for (x, y) in [(23, 30), (20, 33), (22, 32)] {
            assert_eq!(img.get_pixel(x, y), frame.get_pixel(x, y), "({x}, {y})");
        }
        // A keypoint is larger (radius 3) and drawn over the landmarks at its place.
        assert_eq!(*img.get_pixel(40, 40), KEYPOINT);
        assert_eq!(*img.get_pixel(43, 40), KEYPOINT);
        assert_eq!(img.get_pixel(44, 40), frame.get_pixel(44, 40));
        // Points at the frame's edge are drawn as far as they fall inside it.
        assert_eq!(*img.get_pixel(63, 0), LANDMARK);
        assert_eq!(*img.get_pixel(61, 0), LANDMARK);
        assert_eq!(*img.get_pixel(62, 1), LANDMARK);
        assert_eq!(*img.get_pixel(0, 30), LANDMARK);
        assert_eq!(*img.get_pixel(0, 63), KEYPOINT);
    }

    #[test]
    fn dots_grow_on_large_frames() {
        let mut img = RgbImage::new(1024, 1024);
        draw(&mut img, &result(&[[500.0, 500.0, 0.0]], &[]));
        // 1024 / 256 = radius 4.
        assert_eq!(*img.get_pixel(504, 500), LANDMARK);
        assert_eq!(*img.get_pixel(505, 500), Rgb([0, 0, 0]));
    }
}
