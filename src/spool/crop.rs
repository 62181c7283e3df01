//! Cascades: a model whose input is a region of an earlier model's detection rather than
//! the whole frame. The region is computed as MediaPipe computes its regions of interest
//! (`DetectionsToRectsCalculator` then `RectTransformationCalculator`): the detection's
//! box, rotated so that the line between two of its keypoints has a target angle, shifted
//! in its own axes, squared on its long side, scaled. The crop samples that rotated
//! rectangle bilinearly into the model's input (`ImageToTensorCalculator` with its default
//! border, which replicates the edge), and points the model finds in its input map back
//! through the same rectangle into the frame.
//!
//! MediaPipe's numbers, from its graphs (`mediapipe/modules/`): face landmarks
//! (`face_landmark/face_detection_front_detection_to_roi.pbtxt`) rotate by keypoints 0 and
//! 1 (the eyes) to 0°, scale 1.5, square on the long side; hand landmarks
//! (`hand_landmark/palm_detection_detection_to_roi.pbtxt`) rotate by keypoints 0 and 2
//! (wrist centre, middle finger MCP) to 90°, shift y by -0.5, scale 2.6, square.
//!
//! Coordinates are the frame's pixels, pixel (i, j) covering [i, i+1) × [j, j+1).

use super::schema::{Detection, Roi};
use crate::model::{ColorOrder, Preprocess};
use crate::runtime::FloatTensor;
use anyhow::{Result, ensure};
use image::RgbImage;
use serde::Deserialize;

/// What happens where a crop reaches beyond the frame.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Border {
    /// The nearest edge pixel (MediaPipe's default for its landmark crops).
    #[default]
    Replicate,
    /// Black: pixel value 0 before normalisation.
    Zero,
}

/// How a detection becomes a region of interest (`[model.input]`, docs/spool.md).
#[derive(Clone, Debug, PartialEq)]
pub struct RoiSpec {
    /// Keypoints (start, end) whose direction is rotated to `angle`; none: upright.
    pub(crate) rotate_by: Option<[usize; 2]>,
    /// Radians, the direction start → end has in the crop (0: to the right, π/2: up).
    pub(crate) angle: f32,
    /// Multiplies width and height, after squaring.
    pub scale: [f32; 2],
    /// Moves the centre by these fractions of the box's width and height, along the
    /// region's own (rotated) axes, before squaring.
    pub(crate) shift: [f32; 2],
    /// Make the region square on its long side.
    pub(crate) square: bool,
}

impl RoiSpec {
    /// The region of `d`; fails on a detection whose keypoints or box are not finite, or
    /// whose box is empty (nothing to crop).
    pub fn roi(&self, d: &Detection) -> Result<Roi> {
        let [x0, y0, x1, y1] = d.bbox;
        let (w, h) = (x1 - x0, y1 - y0);
        ensure!(
            [x0, y0, x1, y1].iter().all(|v| v.is_finite()) && w > 0.0 && h > 0.0,
            "the detection's box {:?} is empty or not finite",
            d.bbox
        );
        let rotation = match self.rotate_by {
            None => 0.0,
            Some([a, b]) => {
                let (Some(p), Some(q)) = (d.keypoints.get(a), d.keypoints.get(b)) else {
                    anyhow::bail!(
                        "rotate_by needs keypoints {a} and {b}; the detection has {}",
                        d.keypoints.len()
                    );
                };
                ensure!(
                    p.iter().chain(q).all(|v| v.is_finite()),
                    "keypoints {a} and {b} are not finite"
                );
                // Image y points down: the direction's angle on screen is atan2(-dy, dx).
                normalise_radians(self.angle - (-(q[1] - p[1])).atan2(q[0] - p[0]))
            }
        };
        let (s, c) = rotation.sin_cos();
        let (dx, dy) = (w * self.shift[0], h * self.shift[1]);
        let center = [
            (x0 + x1) / 2.0 + c * dx - s * dy,
            (y0 + y1) / 2.0 + s * dx + c * dy,
        ];
        let (w, h) = if self.square {
            (w.max(h), w.max(h))
        } else {
            (w, h)
        };
        Ok(Roi {
            center,
            size: [w * self.scale[0], h * self.scale[1]],
            rotation,
        })
    }
}

/// Into [-π, π), as MediaPipe's `NormalizeRadians`.
fn normalise_radians(a: f32) -> f32 {
    use std::f32::consts::PI;
    a - 2.0 * PI * ((a + PI) / (2.0 * PI)).floor()
}

/// The model input for the region `roi` of `frame`: [1, H, W, C] (`shape`), each input
/// pixel sampled bilinearly at its centre's place in the region (the region stretched to
/// the input), then ordered and normalised as `pre` says.
pub(crate) fn crop_input(
    frame: &RgbImage,
    roi: &Roi,
    border: Border,
    pre: &Preprocess,
    shape: &[usize],
) -> Result<FloatTensor> {
    ensure!(
        shape.len() == 4 && shape[0] == 1 && (shape[3] == 1 || shape[3] == 3),
        "image input must be [1, H, W, 1 or 3], the model wants {shape:?}"
    );
    ensure!(
        roi.size.iter().all(|s| s.is_finite() && *s > 0.0)
            && roi.center.iter().all(|c| c.is_finite())
            && roi.rotation.is_finite(),
        "the region {roi:?} is empty or not finite"
    );
    let (h, w, c) = (shape[1], shape[2], shape[3]);
    let mut data = Vec::with_capacity(h * w * c);
    for y in 0..h {
        for x in 0..w {
            let [fx, fy] = roi.to_frame((x as f32 + 0.5) / w as f32, (y as f32 + 0.5) / h as f32);
            let rgb = sample(frame, fx - 0.5, fy - 0.5, border);
            push_normalised(&mut data, rgb, pre, c);
        }
    }
    FloatTensor::new(shape.to_vec(), data)
}

/// The frame's colour at (x, y) in pixel-centre coordinates (pixel (i, j) at (i, j)),
/// interpolated between the four nearest pixels.
fn sample(frame: &RgbImage, x: f32, y: f32, border: Border) -> [f32; 3] {
    let (fw, fh) = (frame.width() as i64, frame.height() as i64);
    let (x0, y0) = (x.floor(), y.floor());
    let (ax, ay) = (x - x0, y - y0);
    let (x0, y0) = (x0 as i64, y0 as i64);
    let mut out = [0f32; 3];
    for (dy, wy) in [(0, 1.0 - ay), (1, ay)] {
        for (dx, wx) in [(0, 1.0 - ax), (1, ax)] {
            let (px, py) = (x0 + dx, y0 + dy);
            let inside = (0..fw).contains(&px) && (0..fh).contains(&py);
            if !inside && border == Border::Zero {
                continue;
            }
            let (px, py) = (px.clamp(0, fw - 1), py.clamp(0, fh - 1));
            let p = frame.get_pixel(px as u32, py as u32).0;
            for ch in 0..3 {
                out[ch] += wx * wy * f32::from(p[ch]);
            }
        }
    }
    out
}

/// Appends one pixel, ordered and normalised as `pre` says, with `c` channels (1 or 3).
pub(crate) fn push_normalised(
    data: &mut Vec<f32>,
    [r, g, b]: [f32; 3],
    pre: &Preprocess,
    c: usize,
) {
    let param = |v: &[f32], ch: usize| if v.len() == 1 { v[0] } else { v[ch] };
    if c == 1 || pre.color == ColorOrder::Gray {
        // ITU-R BT.601 luma, as the image crate and OpenCV compute it.
        let y = 0.299 * r + 0.587 * g + 0.114 * b;
        for ch in 0..c {
            data.push((y - param(&pre.mean, ch)) / param(&pre.std, ch));
        }
    } else {
        let ordered = if pre.color == ColorOrder::Bgr {
            [b, g, r]
        } else {
            [r, g, b]
        };
        for (ch, v) in ordered.into_iter().enumerate() {
            data.push((v - param(&pre.mean, ch)) / param(&pre.std, ch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;
    use std::f32::consts::{FRAC_PI_2, PI};

    fn detection(bbox: [f32; 4], keypoints: Vec<[f32; 2]>) -> Detection {
        Detection {
            score: 0.9,
            bbox,
            keypoints,
            crops: vec![],
        }
    }

    fn face() -> RoiSpec {
        RoiSpec {
            rotate_by: Some([0, 1]),
            angle: 0.0,
            scale: [1.5, 1.5],
            shift: [0.0, 0.0],
            square: true,
        }
    }

    #[test]
    fn upright_eyes_give_an_upright_square_region() {
        let d = detection([10.0, 20.0, 50.0, 40.0], vec![[20.0, 25.0], [40.0, 25.0]]);
        let r = face().roi(&d).unwrap();
        assert_eq!(r.center, [30.0, 30.0]);
        assert_eq!(r.size, [60.0, 60.0]);
        assert!(r.rotation.abs() < 1e-6);
    }

    #[test]
    fn tilted_eyes_rotate_the_region_with_them() {
        // The right eye 10 px lower than the left over 10 px: the head is turned 45°
        // clockwise on screen, and so is the region.
        let d = detection([0.0, 0.0, 40.0, 40.0], vec![[10.0, 10.0], [20.0, 20.0]]);
        let r = face().roi(&d).unwrap();
        assert!((r.rotation - PI / 4.0).abs() < 1e-6, "{}", r.rotation);
        // The region's x axis follows the eyes: its right edge's centre lies down-right.
        let [x, y] = r.to_frame(1.0, 0.5);
        let half = 30.0 / 2f32.sqrt();
        assert!((x - (20.0 + half)).abs() < 1e-4 && (y - (20.0 + half)).abs() < 1e-4);
    }

    #[test]
    fn a_palm_region_is_shifted_towards_the_fingers() {
        // MediaPipe's palm → hand numbers; the hand points up (wrist below the middle
        // finger), so no rotation, and the centre moves up by half the box height.
        let palm = RoiSpec {
            rotate_by: Some([0, 2]),
            angle: FRAC_PI_2,
            scale: [2.6, 2.6],
            shift: [0.0, -0.5],
            square: true,
        };
        let d = detection(
            [100.0, 100.0, 140.0, 160.0],
            vec![[120.0, 150.0], [0.0, 0.0], [120.0, 110.0]],
        );
        let r = palm.roi(&d).unwrap();
        assert!(r.rotation.abs() < 1e-6, "{}", r.rotation);
        assert!((r.center[0] - 120.0).abs() < 1e-4 && (r.center[1] - 100.0).abs() < 1e-4);
        assert!((r.size[0] - 156.0).abs() < 1e-3 && (r.size[1] - 156.0).abs() < 1e-3);
        // Pointing right instead: a quarter turn, and the shift follows the fingers.
        let d = detection(
            [100.0, 100.0, 160.0, 140.0],
            vec![[110.0, 120.0], [0.0, 0.0], [150.0, 120.0]],
        );
        let r = palm.roi(&d).unwrap();
        assert!((r.rotation - FRAC_PI_2).abs() < 1e-6, "{}", r.rotation);
        assert!((r.center[0] - 150.0).abs() < 1e-4 && (r.center[1] - 120.0).abs() < 1e-4);
    }

    #[test]
    fn bad_detections_are_errors_not_panics() {
        let d = detection([10.0, 10.0, 10.0, 30.0], vec![[0.0, 0.0], [1.0, 0.0]]);
        assert!(face().roi(&d).is_err(), "empty box");
        let d = detection([0.0, 0.0, 10.0, f32::NAN], vec![[0.0, 0.0], [1.0, 0.0]]);
        assert!(face().roi(&d).is_err(), "NaN box");
        let d = detection([0.0, 0.0, 10.0, 10.0], vec![[0.0, 0.0]]);
        assert!(face().roi(&d).is_err(), "missing keypoint");
    }

    #[test]
    fn crops_sample_the_rotated_region_and_its_border() {
        // Left half black, right half white; a region over the right half, and the same
        // turned half a turn, which puts the black half on the right of the crop.
        let frame = RgbImage::from_fn(8, 8, |x, _| {
            if x < 4 {
                Rgb([0, 0, 0])
            } else {
                Rgb([255, 255, 255])
            }
        });
        let pre = Preprocess {
            mean: vec![0.0],
            std: vec![255.0],
            ..Default::default()
        };
        let roi = Roi {
            center: [6.0, 4.0],
            size: [4.0, 4.0],
            rotation: 0.0,
        };
        let t = crop_input(&frame, &roi, Border::Replicate, &pre, &[1, 4, 4, 3]).unwrap();
        assert!(t.data.iter().all(|&v| v == 1.0), "{:?}", t.data);
        let turned = Roi {
            center: [4.0, 4.0],
            size: [8.0, 8.0],
            rotation: PI,
        };
        let t = crop_input(&frame, &turned, Border::Replicate, &pre, &[1, 2, 2, 1]).unwrap();
        let want = [1.0, 0.0, 1.0, 0.0];
        assert!(
            t.data.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5),
            "{:?}",
            t.data
        );
        // Beyond the frame: the edge replicated, or black.
        let outside = Roi {
            center: [12.0, 4.0],
            size: [4.0, 4.0],
            rotation: 0.0,
        };
        let t = crop_input(&frame, &outside, Border::Replicate, &pre, &[1, 2, 2, 1]).unwrap();
        assert!(
            t.data.iter().all(|&v| (v - 1.0).abs() < 1e-5),
            "{:?}",
            t.data
        );
        let t = crop_input(&frame, &outside, Border::Zero, &pre, &[1, 2, 2, 1]).unwrap();
        assert!(t.data.iter().all(|&v| v == 0.0));
        let empty = Roi {
            size: [0.0, 4.0],
            ..roi
        };
        assert!(crop_input(&frame, &empty, Border::Zero, &pre, &[1, 2, 2, 1]).is_err());
    }
}
