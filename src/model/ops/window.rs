//! Sliding windows, shared by convolutions and pooling: padding and output extents.

use anyhow::{Result, bail, ensure};
use tract_tflite::tflite;

/// How a window op pads its input (TFLite's two modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// Output size `ceil(input / stride)`, padded evenly (the extra at the end).
    Same,
    /// No padding: only whole windows.
    Valid,
}

impl Padding {
    pub(crate) fn from_tflite(padding: tflite::Padding) -> Result<Padding> {
        Ok(match padding {
            tflite::Padding::SAME => Padding::Same,
            tflite::Padding::VALID => Padding::Valid,
            other => bail!("padding {:?} is not supported", other),
        })
    }

    pub(crate) fn to_tflite(self) -> tflite::Padding {
        match self {
            Padding::Same => tflite::Padding::SAME,
            Padding::Valid => tflite::Padding::VALID,
        }
    }
}

/// Output extent (height, width) of a sliding window of `kernel` with `stride` and
/// `dilation` over `h`×`w`, TFLite's rules for SAME and VALID.
pub(crate) fn conv_out(
    h: usize,
    w: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    padding: Padding,
) -> Result<(usize, usize)> {
    ensure!(
        stride
            .iter()
            .chain(&dilation)
            .chain(&kernel)
            .all(|&v| v > 0),
        "zero kernel, stride or dilation"
    );
    let one = |n: usize, k: usize, s: usize, d: usize| -> Result<usize> {
        let eff = (k - 1) * d + 1;
        Ok(match padding {
            Padding::Same => n.div_ceil(s),
            Padding::Valid => {
                ensure!(n >= eff, "window {} larger than input {}", eff, n);
                (n - eff) / s + 1
            }
        })
    };
    Ok((
        one(h, kernel[0], stride[0], dilation[0])?,
        one(w, kernel[1], stride[1], dilation[1])?,
    ))
}

/// A window extent, stride or dilation read from a file: positive.
pub(crate) fn positive(v: i32, what: &str) -> Result<usize> {
    ensure!(v > 0, "{what} is {v}");
    Ok(v as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_and_valid_extents_follow_tflite() {
        assert_eq!(
            conv_out(227, 227, [11, 11], [4, 4], [1, 1], Padding::Valid).unwrap(),
            (55, 55)
        );
        assert_eq!(
            conv_out(56, 56, [3, 3], [2, 2], [1, 1], Padding::Same).unwrap(),
            (28, 28)
        );
        assert!(conv_out(2, 2, [3, 3], [1, 1], [1, 1], Padding::Valid).is_err());
    }
}
