//! Frames → input tensors: decode (JPEG, PNG, PPM/PGM, BMP) within limits, resize, order
//! channels and normalise as the model's manifest says.

use super::resize::triangle_resize;
use crate::model::{Preprocess, ResizeMode};
use crate::runtime::FloatTensor;
use anyhow::{Context, Result, ensure};
use image::{DynamicImage, RgbImage};
use std::path::Path;

/// Largest frame file read (a 12 MP camera JPEG is well under this).
pub(crate) const MAX_FRAME_BYTES: u64 = 64 << 20;
/// Largest decoded side; a header claiming more is refused before any allocation.
pub(crate) const MAX_SIDE: u32 = 16384;
/// Largest allocation the decoder may make.
pub(crate) const MAX_DECODE_ALLOC: u64 = 512 << 20;

/// Reads a frame file (refusing one over the frame size limit) and decodes it.
pub fn decode_file(path: &Path) -> Result<DynamicImage> {
    let bytes = crate::model::package::read_limited_bytes(path, MAX_FRAME_BYTES)?;
    decode(&bytes).with_context(|| path.display().to_string())
}

/// Decodes by content, not by file name, with size limits.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage> {
    let (reader, format) = reader(bytes)?;
    let img = reader
        .decode()
        .with_context(|| format!("decoding {format:?}"))?;
    ensure!(
        img.width() > 0 && img.height() > 0,
        "the image has no pixels"
    );
    Ok(img)
}

/// Bytes decoding `bytes` will allocate: the decoded pixels at their colour type, and the
/// 8-bit RGB copy models are resized from (3 bytes a pixel); and the number of pixels.
/// Reads only the header; fails as `decode` would on what `decode` refuses before
/// decoding.
pub(crate) fn decoded_bytes(bytes: &[u8]) -> Result<(u64, u64)> {
    use image::ImageDecoder;
    let (reader, format) = reader(bytes)?;
    let decoder = reader
        .into_decoder()
        .with_context(|| format!("decoding {format:?}"))?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    Ok((
        pixels * (decoder.color_type().bytes_per_pixel() as u64 + 3) + (64 << 10),
        pixels,
    ))
}

/// A reader for a supported, complete image, with the decoder's limits set.
fn reader(
    bytes: &[u8],
) -> Result<(
    image::ImageReader<std::io::Cursor<&[u8]>>,
    image::ImageFormat,
)> {
    ensure!(!bytes.is_empty(), "the file is empty");
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .context("reading the image header")?;
    let format = reader
        .format()
        .context("not a JPEG, PNG, PPM/PGM or BMP image")?;
    ensure!(
        matches!(
            format,
            image::ImageFormat::Jpeg
                | image::ImageFormat::Png
                | image::ImageFormat::Pnm
                | image::ImageFormat::Bmp
        ),
        "{format:?} images are not supported (JPEG, PNG, PPM/PGM, BMP are)"
    );
    ensure!(
        format != image::ImageFormat::Jpeg || jpeg_is_complete(bytes),
        "the JPEG has no end-of-image marker after its scan (cut short, still being written, or corrupt)"
    );
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    Ok((reader, format))
}

/// Whether a JPEG stream reaches its end-of-image marker. Decoders fill a truncated scan
/// with grey and report success, so a frame cut short would be analysed as if whole.
/// The marker segments are walked up to the first start-of-scan (an EXIF thumbnail before
/// it has its own end-of-image); after it, entropy-coded data never holds FF D9 (an FF
/// there is followed by 00 or a restart marker), so any FF D9 is the end.
fn jpeg_is_complete(b: &[u8]) -> bool {
    let mut i = 2;
    loop {
        while i + 1 < b.len() && b[i] == 0xFF && b[i + 1] == 0xFF {
            i += 1;
        }
        if i + 4 > b.len() || b[i] != 0xFF || b[i + 1] == 0xD9 {
            return false;
        }
        let end = i + 2 + u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        if b[i + 1] == 0xDA {
            return end <= b.len() && b[end..].windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        i = end;
    }
}

/// The model input for one frame: NHWC, `shape` = [1, H, W, C] with C of 1 or 3.
pub fn to_input(img: &DynamicImage, pre: &Preprocess, shape: &[usize]) -> Result<FloatTensor> {
    to_input_rgb(&img.to_rgb8(), pre, shape)
}

/// `to_input` for a frame already in 8-bit RGB.
pub(crate) fn to_input_rgb(
    img: &RgbImage,
    pre: &Preprocess,
    shape: &[usize],
) -> Result<FloatTensor> {
    ensure!(
        shape.len() == 4 && shape[0] == 1 && (shape[3] == 1 || shape[3] == 3),
        "image input must be [1, H, W, 1 or 3], the model wants {:?}",
        shape
    );
    let (h, w, c) = (shape[1] as u32, shape[2] as u32, shape[3]);
    let rgb = fit(img, w, h, pre.resize);
    let mut data = Vec::with_capacity((w * h) as usize * c);
    for px in rgb.pixels() {
        super::crop::push_normalised(&mut data, px.0.map(f32::from), pre, c);
    }
    FloatTensor::new(shape.to_vec(), data)
}

fn fit(src: &RgbImage, w: u32, h: u32, mode: ResizeMode) -> RgbImage {
    let (sw, sh) = src.dimensions();
    match mode {
        ResizeMode::Stretch => triangle_resize(src, w, h),
        ResizeMode::Crop => {
            let (cw, ch) = crop_window(sw, sh, w, h);
            let view =
                image::imageops::crop_imm(src, (sw - cw) / 2, (sh - ch) / 2, cw, ch).to_image();
            triangle_resize(&view, w, h)
        }
        ResizeMode::Letterbox => {
            let (rw, rh) = letterbox_size(sw, sh, w, h);
            let inner = triangle_resize(src, rw, rh);
            let mut out = RgbImage::new(w, h);
            image::imageops::replace(
                &mut out,
                &inner,
                ((w - rw) / 2) as i64,
                ((h - rh) / 2) as i64,
            );
            out
        }
    }
}

/// Largest centred window of the frame with the target's aspect ratio.
fn crop_window(sw: u32, sh: u32, w: u32, h: u32) -> (u32, u32) {
    if (sw as u64) * (h as u64) > (sh as u64) * (w as u64) {
        (((sh as u64 * w as u64) / h as u64).max(1) as u32, sh)
    } else {
        (sw, ((sw as u64 * h as u64) / w as u64).max(1) as u32)
    }
}

/// Size of the frame scaled to fit inside the target.
fn letterbox_size(sw: u32, sh: u32, w: u32, h: u32) -> (u32, u32) {
    let scale = (w as f64 / sw as f64).min(h as f64 / sh as f64);
    (
        ((sw as f64 * scale).round() as u32).clamp(1, w),
        ((sh as f64 * scale).round() as u32).clamp(1, h),
    )
}

/// Where a point of the model input (coordinates normalised to 0..1) lies in the frame,
/// in pixels: the inverse of the resize `to_input` did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    scale: (f32, f32),
    offset: (f32, f32),
}

impl Geometry {
    /// For a `fw`×`fh` frame fitted to a `w`×`h` input by `mode`.
    pub fn new(mode: ResizeMode, fw: u32, fh: u32, w: u32, h: u32) -> Geometry {
        match mode {
            ResizeMode::Stretch => Geometry::stretch(fw, fh),
            ResizeMode::Crop => {
                let (cw, ch) = crop_window(fw, fh, w, h);
                Geometry {
                    scale: (cw as f32, ch as f32),
                    offset: (((fw - cw) / 2) as f32, ((fh - ch) / 2) as f32),
                }
            }
            ResizeMode::Letterbox => {
                let (rw, rh) = letterbox_size(fw, fh, w, h);
                let (px, py) = (((w - rw) / 2) as f32, ((h - rh) / 2) as f32);
                let (kx, ky) = (fw as f32 / rw as f32, fh as f32 / rh as f32);
                Geometry {
                    scale: (w as f32 * kx, h as f32 * ky),
                    offset: (-px * kx, -py * ky),
                }
            }
        }
    }

    pub(crate) fn stretch(fw: u32, fh: u32) -> Geometry {
        Geometry {
            scale: (fw as f32, fh as f32),
            offset: (0.0, 0.0),
        }
    }

    /// The frame's pixel (x, y) of the input's pixel (x, y).
    pub fn to_frame(&self, x: f32, y: f32) -> (f32, f32) {
        (
            x * self.scale.0 + self.offset.0,
            y * self.scale.1 + self.offset.1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ColorOrder;
    use image::Rgb;

    fn pre(resize: ResizeMode, color: ColorOrder) -> Preprocess {
        Preprocess {
            resize,
            color,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        }
    }

    #[test]
    fn normalises_and_orders_channels() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 4, Rgb([10, 20, 30])));
        let rgb = to_input(
            &img,
            &Preprocess {
                mean: vec![10.0, 20.0, 30.0],
                std: vec![2.0; 3],
                ..pre(ResizeMode::Stretch, ColorOrder::Rgb)
            },
            &[1, 2, 2, 3],
        )
        .unwrap();
        assert!(rgb.data.iter().all(|&v| v == 0.0), "{:?}", rgb.data);
        let bgr = to_input(
            &img,
            &pre(ResizeMode::Stretch, ColorOrder::Bgr),
            &[1, 2, 2, 3],
        )
        .unwrap();
        assert_eq!(&bgr.data[..3], &[30.0, 20.0, 10.0]);
        let gray = to_input(
            &img,
            &pre(ResizeMode::Stretch, ColorOrder::Rgb),
            &[1, 2, 2, 1],
        )
        .unwrap();
        assert!((gray.data[0] - (0.299 * 10.0 + 0.587 * 20.0 + 0.114 * 30.0)).abs() < 1e-4);
    }

    #[test]
    fn letterbox_pads_and_crop_cuts() {
        // A 4x2 white image into a 4x4 input: letterbox leaves black rows top and bottom.
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 2, Rgb([255, 255, 255])));
        let lb = to_input(
            &img,
            &pre(ResizeMode::Letterbox, ColorOrder::Rgb),
            &[1, 4, 4, 3],
        )
        .unwrap();
        assert_eq!(lb.data[0], 0.0);
        assert_eq!(lb.data[(4 + 1) * 3], 255.0);
        // Crop of a half-black, half-white 4x2 image to a square keeps the centre.
        let mut two = RgbImage::new(4, 2);
        for x in 2..4 {
            for y in 0..2 {
                two.put_pixel(x, y, Rgb([255, 255, 255]));
            }
        }
        let cropped = to_input(
            &DynamicImage::ImageRgb8(two),
            &pre(ResizeMode::Crop, ColorOrder::Rgb),
            &[1, 2, 2, 3],
        )
        .unwrap();
        assert_eq!(cropped.data[0], 0.0);
        assert_eq!(cropped.data[3], 255.0);
    }

    #[test]
    fn geometry_inverts_the_resize() {
        // 200×100 letterboxed into 100×100: rows 25..75 hold the frame.
        let g = Geometry::new(ResizeMode::Letterbox, 200, 100, 100, 100);
        assert_eq!(g.to_frame(0.0, 0.25), (0.0, 0.0));
        assert_eq!(g.to_frame(1.0, 0.75), (200.0, 100.0));
        // 200×100 cropped to a square: the centre 100×100, from x = 50.
        let g = Geometry::new(ResizeMode::Crop, 200, 100, 10, 10);
        assert_eq!(g.to_frame(0.0, 0.0), (50.0, 0.0));
        assert_eq!(g.to_frame(1.0, 1.0), (150.0, 100.0));
        let g = Geometry::new(ResizeMode::Stretch, 200, 100, 10, 10);
        assert_eq!(g.to_frame(0.5, 0.5), (100.0, 50.0));
    }

    #[test]
    fn refuses_bad_input_without_panicking() {
        assert!(decode(b"").is_err());
        assert!(decode(b"definitely not an image").is_err());
        let mut png = vec![];
        DynamicImage::ImageRgb8(RgbImage::new(8, 8))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(decode(&png).is_ok());
        assert!(decode(&png[..png.len() / 2]).is_err());
    }

    #[test]
    fn a_jpeg_cut_short_is_refused() {
        let img = RgbImage::from_fn(64, 64, |x, y| {
            Rgb([(x * 4) as u8, (y * 4) as u8, (x ^ y) as u8])
        });
        let mut jpg = vec![];
        DynamicImage::ImageRgb8(img)
            .write_to(
                &mut std::io::Cursor::new(&mut jpg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        assert!(decode(&jpg).is_ok());
        // The decoder alone accepts the cut file, greying the missing rows.
        let cut = &jpg[..jpg.len() * 3 / 4];
        assert!(image::load_from_memory(cut).is_ok());
        let err = format!("{:#}", decode(cut).unwrap_err());
        assert!(err.contains("end-of-image"), "{err}");
        // Bytes after the end (camera trailers) are fine.
        let mut trailer = jpg.clone();
        trailer.extend_from_slice(b"trailer");
        assert!(decode(&trailer).is_ok());
    }
}
