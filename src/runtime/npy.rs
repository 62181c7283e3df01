//! NumPy `.npy` files of little-endian float32 (written) or float32/float64 (read).

use anyhow::{Context, Result, bail, ensure};
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

/// A dense float32 array in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, in C order.
    pub data: Vec<f32>,
}

/// Writes a `.npy` file (format 1.0, little-endian f32, C order) that NumPy reads.
pub fn write(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    std::fs::write(path, encode(shape, data)).with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn encode(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims = match shape.len() {
        1 => format!("{},", shape[0]),
        _ => shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // The header, with magic, version and length, pads to a multiple of 64 and ends in \n.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a `.npy` file of f32 values in C order (what [`write`] writes and NumPy's
/// default for float32).
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&bytes).with_context(|| format!("{}: not a float .npy file", path.display()))
}

/// Parses the bytes of a `.npy` file (see [`read`]).
pub fn decode(bytes: &[u8]) -> Result<Array> {
    ensure!(
        bytes.len() >= 10 && bytes.starts_with(MAGIC),
        "missing the NumPy magic"
    );
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            ensure!(bytes.len() >= 12, "truncated header");
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => bail!("format version {v}"),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .context("truncated header")?;
    let header = std::str::from_utf8(&bytes[start..end]).context("header is not text")?;
    let descr = dict_value(header, "descr").context("no descr")?;
    let fortran = dict_value(header, "fortran_order").context("no fortran_order")?;
    ensure!(
        fortran.starts_with("False"),
        "Fortran order is not supported"
    );
    let shape_text = dict_value(header, "shape").context("no shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .context("shape is not a tuple")?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .with_context(|| format!("shape entry '{s}'"))
        })
        .collect::<Result<_>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("shape overflows")?;
    let body = &bytes[end..];
    let quoted = descr.trim_start_matches(['\'', '"']);
    let data: Vec<f32> = if quoted.starts_with("<f4") || quoted.starts_with("|f4") {
        ensure!(
            body.len() == n * 4,
            "{} data bytes for {} float32 values",
            body.len(),
            n
        );
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else if quoted.starts_with("<f8") {
        ensure!(
            body.len() == n * 8,
            "{} data bytes for {} float64 values",
            body.len(),
            n
        );
        body.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect()
    } else {
        bail!("element type {descr} (float32 or float64 expected)")
    };
    Ok(Array { shape, data })
}

/// The text after `'key':` in a NumPy header dict.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    Some(rest.trim_start().strip_prefix(':')?.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_aligns_the_header() {
        let bytes = encode(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
        assert_eq!((bytes.len() - 24) % 64, 0);
        let a = decode(&bytes).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data[5], 6.5);
        let one = decode(&encode(&[4], &[0.0; 4])).unwrap();
        assert_eq!(one.shape, vec![4]);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for bad in [
            &b""[..],
            b"\x93NUMPY",
            b"\x93NUMPY\x01\x00\xff\xff{",
            b"not numpy at all",
        ] {
            assert!(decode(bad).is_err());
        }
        let mut short = encode(&[8], &[1.0; 8]);
        short.truncate(short.len() - 3);
        assert!(decode(&short).is_err());
    }
}
