//! The one wire codec: a [`Reader`] over received bytes and `put_*` writers.
//!
//! Implements the encodings of PROTOCOL.md §2: big-endian `u8/u16/u32/u64`, `str(x)` (u16 length then
//! UTF-8), `blob(x)` (u32 length then bytes), 33-byte compressed points and 32-byte scalars. Every
//! wire type implements [`Encode`] and [`Decode`]; [`Decode::from_bytes`] rejects trailing bytes.
//!
//! # Usage
//! ```
//! use quva_client::codec::{put_str, put_u32, Reader};
//! let mut out = Vec::new();
//! put_u32(&mut out, 7);
//! put_str(&mut out, "sensors/room1");
//! let mut r = Reader::new(&out);
//! assert_eq!(r.u32("epoch").unwrap(), 7);
//! assert_eq!(r.str("group").unwrap(), "sensors/room1");
//! r.finish("example").unwrap();
//! ```

use crate::curve::{Point, SecretScalar};
use k256::Scalar;

/// Why received bytes could not be decoded. The `&'static str` names the field or structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside this field.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Bytes remained after this structure.
    #[error("trailing bytes after {0}")]
    TrailingBytes(&'static str),
    /// Not a valid compressed curve point (identity, off-curve, x ≥ p, wrong tag).
    #[error("invalid point in {0}")]
    InvalidPoint(&'static str),
    /// A scalar that is not below the group order n.
    #[error("scalar out of range in {0}")]
    InvalidScalar(&'static str),
    /// A secret scalar that is zero.
    #[error("zero secret in {0}")]
    ZeroScalar(&'static str),
    /// A version byte this implementation does not speak.
    #[error("unknown version of {0}")]
    UnknownVersion(&'static str),
    /// A field outside its allowed set of values.
    #[error("invalid value of {0}")]
    InvalidValue(&'static str),
    /// Text that is not UTF-8.
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    /// A device or group identifier outside PROTOCOL.md §2's rules.
    #[error("invalid identifier in {0}")]
    InvalidId(&'static str),
    /// A field larger than its limit.
    #[error("{0} too large")]
    TooLarge(&'static str),
}

/// A cursor over received bytes. Every method names the field it reads, for the error.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading `buf` from its first byte.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Everything consumed so far: the "all fields before" of signatures and AEAD data.
    pub fn consumed(&self) -> &'a [u8] {
        // INVARIANT: pos never exceeds buf.len().
        &self.buf[..self.pos]
    }

    /// Takes the next `n` bytes.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] if fewer remain.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Truncated(what))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated(what))?;
        self.pos = end;
        Ok(bytes)
    }

    /// Takes the next `N` bytes as an array.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] if fewer remain.
    pub fn take_array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// Takes everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        self.pos = self.buf.len();
        rest
    }

    /// Reads a `u8`.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`].
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take_array::<1>(what)?[0])
    }

    /// Reads a big-endian `u16`.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`].
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take_array(what)?))
    }

    /// Reads a big-endian `u32`.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`].
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take_array(what)?))
    }

    /// Reads a big-endian `u64`.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`].
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take_array(what)?))
    }

    /// Reads a version byte and checks it is 1.
    ///
    /// # Errors
    /// [`DecodeError::UnknownVersion`] for anything but 1.
    pub fn version(&mut self, what: &'static str) -> Result<(), DecodeError> {
        match self.u8(what)? {
            1 => Ok(()),
            _ => Err(DecodeError::UnknownVersion(what)),
        }
    }

    /// Reads `str(x)`: a u16 length then UTF-8.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] or [`DecodeError::InvalidUtf8`].
    pub fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let len = self.u16(what)?;
        let bytes = self.take(usize::from(len), what)?;
        core::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8(what))
    }

    /// Reads `blob(x)`: a u32 length then bytes.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`].
    pub fn blob(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::TooLarge(what))?;
        self.take(len, what)
    }

    /// Reads `pt(P)`: a 33-byte compressed point, never the identity.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] or [`DecodeError::InvalidPoint`].
    pub fn point(&mut self, what: &'static str) -> Result<Point, DecodeError> {
        let bytes = self.take_array::<33>(what)?;
        Point::from_bytes(&bytes).ok_or(DecodeError::InvalidPoint(what))
    }

    /// Reads `sc(k)`: a 32-byte big-endian scalar below n (zero allowed: signature `s`).
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] or [`DecodeError::InvalidScalar`].
    pub fn scalar(&mut self, what: &'static str) -> Result<Scalar, DecodeError> {
        let bytes = self.take_array::<32>(what)?;
        crate::curve::scalar_from_bytes(&bytes).ok_or(DecodeError::InvalidScalar(what))
    }

    /// Reads a secret scalar: below n and non-zero.
    ///
    /// # Errors
    /// [`DecodeError::InvalidScalar`] or [`DecodeError::ZeroScalar`] besides truncation.
    pub fn secret_scalar(&mut self, what: &'static str) -> Result<SecretScalar, DecodeError> {
        let bytes = zeroize::Zeroizing::new(self.take_array::<32>(what)?);
        SecretScalar::from_bytes(&bytes).map_err(|e| match e {
            crate::curve::ScalarError::OutOfRange => DecodeError::InvalidScalar(what),
            crate::curve::ScalarError::Zero => DecodeError::ZeroScalar(what),
        })
    }

    /// Ends decoding: fails if any byte is left.
    ///
    /// # Errors
    /// [`DecodeError::TrailingBytes`].
    pub fn finish(self, what: &'static str) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(what))
        }
    }
}

/// A wire structure that can be written.
pub trait Encode {
    /// Appends the encoding to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// The encoding as a new vector.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// A wire structure that can be read.
pub trait Decode: Sized {
    /// Reads one structure from the reader, leaving what follows.
    ///
    /// # Errors
    /// Any [`DecodeError`] for malformed input.
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// Decodes exactly `bytes`: trailing bytes are an error.
    ///
    /// # Errors
    /// Any [`DecodeError`] for malformed input.
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let v = Self::read(&mut r)?;
        r.finish(core::any::type_name::<Self>())?;
        Ok(v)
    }
}

/// Appends a `u8`.
pub fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

/// Appends a big-endian `u16`.
pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends a big-endian `u32`.
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends a big-endian `u64`.
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends `str(s)`. Callers pass validated text (identifiers ≤ 128 bytes, client ids ≤ 65535);
/// longer text is cut at 65535 bytes so the length prefix stays truthful.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    put_u16(out, len);
    out.extend_from_slice(bytes.get(..usize::from(len)).unwrap_or(bytes));
}

/// Appends `blob(b)`. Callers bound payloads far below 4 GiB (PROTOCOL.md §6 limits).
pub fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    put_u32(out, len);
    out.extend_from_slice(b.get(..len as usize).unwrap_or(b));
}

/// Appends `pt(P)`.
pub fn put_point(out: &mut Vec<u8>, p: &Point) {
    out.extend_from_slice(&p.to_bytes());
}

/// Appends `sc(k)`.
pub fn put_scalar(out: &mut Vec<u8>, k: &Scalar) {
    out.extend_from_slice(&k.to_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_rejects_truncation_and_trailing_bytes() {
        let mut r = Reader::new(&[0, 5, b'a']);
        assert_eq!(r.str("s"), Err(DecodeError::Truncated("s")));
        let mut r = Reader::new(&[1, 2]);
        assert_eq!(r.u8("a"), Ok(1));
        assert_eq!(r.finish("x"), Err(DecodeError::TrailingBytes("x")));
    }

    #[test]
    fn blob_length_cannot_overflow() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 1]);
        assert_eq!(r.blob("b"), Err(DecodeError::Truncated("b")));
    }

    #[test]
    fn str_rejects_bad_utf8() {
        let mut r = Reader::new(&[0, 1, 0xff]);
        assert_eq!(r.str("s"), Err(DecodeError::InvalidUtf8("s")));
    }

    #[test]
    fn version_must_be_one() {
        assert_eq!(
            Reader::new(&[2]).version("v"),
            Err(DecodeError::UnknownVersion("v"))
        );
        assert_eq!(Reader::new(&[1]).version("v"), Ok(()));
    }
}
