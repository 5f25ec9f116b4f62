//! Hostile-image inspection, before any tool touches the image: the format from its magic bytes,
//! and the header fields that would make qemu-img read other files (qcow2 backing and external
//! data files, VHDX parents, VMDK descriptors naming extents) or that it cannot serve (encryption).
//! OpenStack learnt this the hard way (CVE-2024-32498, CVE-2024-44082).
//!
//! Everything here reads through [`ReadAt`], never trusts an offset or a length from the image,
//! and never panics: every malformed header is an error.

use std::io;

use crate::api::disc_image::ImageFormat;

/// What the image is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Iso,
    Raw,
    Qcow2,
    Vhdx,
    Vmdk,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Iso => "iso",
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
            Self::Vhdx => "vhdx",
            Self::Vmdk => "vmdk",
        }
    }

    /// The format `as_str` names.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Iso, Self::Raw, Self::Qcow2, Self::Vhdx, Self::Vmdk]
            .into_iter()
            .find(|f| f.as_str() == name)
    }

    /// Whether the bytes are served as they are (ISO and raw) or converted to raw first.
    pub fn is_raw(self) -> bool {
        matches!(self, Self::Iso | Self::Raw)
    }

    pub fn as_api(self) -> ImageFormat {
        match self {
            Self::Iso => ImageFormat::Iso,
            Self::Raw => ImageFormat::Raw,
            Self::Qcow2 => ImageFormat::Qcow2,
            Self::Vhdx => ImageFormat::Vhdx,
            Self::Vmdk => ImageFormat::Vmdk,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot read the image: {0}")]
    Io(#[from] io::Error),
    #[error("spec.format is {declared} but the image is {detected}")]
    Mismatch {
        declared: &'static str,
        detected: &'static str,
    },
    #[error(
        "the image is {0}, which discus does not serve; supported formats are iso, raw, qcow2, vhdx and vmdk"
    )]
    Unsupported(&'static str),
    #[error("the image is compressed ({0}); decompress it and publish the image itself")]
    Compressed(&'static str),
    #[error("the image is encrypted ({0}); discus serves unencrypted images only")]
    Encrypted(&'static str),
    #[error(
        "the qcow2 image has a backing file; flatten it (qemu-img convert) into a standalone image"
    )]
    BackingFile,
    #[error(
        "the qcow2 image keeps its data in an external data file; convert it into a standalone image"
    )]
    ExternalDataFile,
    #[error(
        "the VHDX image is a differencing disk (it has a parent); merge it into a standalone image"
    )]
    Differencing,
    #[error(
        "the VMDK is a descriptor that refers to other files; use a monolithicSparse or streamOptimized VMDK"
    )]
    VmdkDescriptor,
    #[error("the VMDK's createType is {0:?}; only monolithicSparse and streamOptimized are served")]
    VmdkCreateType(String),
    #[error(
        "the VMDK's sparse header says capacity 0, which makes qemu-img read its embedded \
         descriptor as a descriptor file that refers to other files; use a monolithicSparse or \
         streamOptimized VMDK"
    )]
    VmdkZeroCapacity,
    #[error(
        "the VMDK names a parent (parentFileNameHint, or a parentCID other than ffffffff): it is \
         a delta disk; use a standalone VMDK"
    )]
    VmdkParent,
    #[error("the VMDK's embedded descriptor is ambiguous ({0}); qemu-img could read it otherwise")]
    VmdkAmbiguous(String),
    #[error("the {format} header is malformed: {what}")]
    Malformed { format: &'static str, what: String },
}

/// Reads at absolute offsets; a read past the end returns fewer bytes.
pub trait ReadAt {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match std::os::unix::fs::FileExt::read_at(self, &mut buf[done..], offset + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// Reads up to `len` bytes at `offset` (fewer at the end of the image).
fn bytes(image: &(impl ReadAt + ?Sized), offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let n = image.read_at(offset, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

fn malformed(format: &'static str, what: impl Into<String>) -> InspectError {
    InspectError::Malformed {
        format,
        what: what.into(),
    }
}

/// Fixed-width integers from a header, with the header's name in the error when it is short.
struct Fields<'a> {
    format: &'static str,
    data: &'a [u8],
}

impl Fields<'_> {
    fn array<const N: usize>(&self, at: usize) -> Result<[u8; N], InspectError> {
        self.data
            .get(at..at + N)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| malformed(self.format, format!("header ends before byte {}", at + N)))
    }
    fn be32(&self, at: usize) -> Result<u32, InspectError> {
        self.array(at).map(u32::from_be_bytes)
    }
    fn be64(&self, at: usize) -> Result<u64, InspectError> {
        self.array(at).map(u64::from_be_bytes)
    }
    fn le16(&self, at: usize) -> Result<u16, InspectError> {
        self.array(at).map(u16::from_le_bytes)
    }
    fn le32(&self, at: usize) -> Result<u32, InspectError> {
        self.array(at).map(u32::from_le_bytes)
    }
    fn le64(&self, at: usize) -> Result<u64, InspectError> {
        self.array(at).map(u64::from_le_bytes)
    }
}

/// The format the magic bytes say, refusing what discus does not serve.
pub fn detect(image: &(impl ReadAt + ?Sized)) -> Result<Format, InspectError> {
    let head = bytes(image, 0, 512)?;
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(b"QFI\xfb") {
        return Ok(Format::Qcow2);
    }
    if starts(b"vhdxfile") {
        return Ok(Format::Vhdx);
    }
    if starts(b"KDMV") {
        return Ok(Format::Vmdk);
    }
    if starts(b"# Disk DescriptorFile") {
        return Err(InspectError::VmdkDescriptor);
    }
    let refusals: [(&[u8], InspectError); 10] = [
        (
            b"COWD",
            InspectError::Unsupported("a VMware ESX sparse extent (COWD)"),
        ),
        (b"QED\0", InspectError::Unsupported("qed")),
        (b"conectix", InspectError::Unsupported("a dynamic VHD")),
        (b"LUKS\xba\xbe", InspectError::Encrypted("LUKS")),
        (b"\x1f\x8b", InspectError::Compressed("gzip")),
        (b"\xfd7zXZ\0", InspectError::Compressed("xz")),
        (b"\x28\xb5\x2f\xfd", InspectError::Compressed("zstd")),
        (b"BZh", InspectError::Compressed("bzip2")),
        (b"PK\x03\x04", InspectError::Compressed("zip")),
        (b"7z\xbc\xaf\x27\x1c", InspectError::Compressed("7-zip")),
    ];
    for (magic, refusal) in refusals {
        if starts(magic) {
            return Err(refusal);
        }
    }
    if head.get(0x40..0x44) == Some(&[0x7f, 0x10, 0xda, 0xbe][..]) {
        return Err(InspectError::Unsupported("VirtualBox VDI"));
    }
    // A fixed VHD is raw data with a 512-byte footer; serving it would append the footer.
    let len = image.size()?;
    if len >= 512 && bytes(image, len - 512, 8)? == b"conectix" {
        return Err(InspectError::Unsupported("a fixed VHD"));
    }
    // ISO 9660 (and UDF) volume descriptors start at sector 16.
    let descriptor = bytes(image, 0x8001, 5)?;
    if matches!(&descriptor[..], b"CD001" | b"BEA01" | b"NSR02" | b"NSR03") {
        return Ok(Format::Iso);
    }
    Ok(Format::Raw)
}

/// Detects the format, compares it with the declared one, and checks the header of formats that
/// can refer to other files.
pub fn inspect(
    image: &(impl ReadAt + ?Sized),
    declared: ImageFormat,
) -> Result<Format, InspectError> {
    let detected = detect(image)?;
    check_declared(declared, detected)?;
    match detected {
        Format::Qcow2 => check_qcow2(image)?,
        Format::Vhdx => check_vhdx(image)?,
        Format::Vmdk => check_vmdk(image)?,
        Format::Iso | Format::Raw => {}
    }
    Ok(detected)
}

/// Refuses an image whose format is not the one `spec.format` declares.
pub fn check_declared(declared: ImageFormat, detected: Format) -> Result<(), InspectError> {
    let matches = match declared {
        ImageFormat::Auto => true,
        // An ISO is the raw image of a disc: served byte for byte either way.
        ImageFormat::Raw => detected.is_raw(),
        declared => declared == detected.as_api(),
    };
    if matches {
        Ok(())
    } else {
        Err(InspectError::Mismatch {
            declared: declared.as_str(),
            detected: detected.as_str(),
        })
    }
}

/// qcow2: no backing file, no external data file, no encryption, no features qemu-img may not know.
fn check_qcow2(image: &(impl ReadAt + ?Sized)) -> Result<(), InspectError> {
    const F: &str = "qcow2";
    let header = bytes(image, 0, 4096)?;
    let h = Fields {
        format: F,
        data: &header,
    };
    let version = h.be32(4)?;
    if !(2..=3).contains(&version) {
        return Err(malformed(
            F,
            format!("version {version} (qemu-img knows 2 and 3)"),
        ));
    }
    if h.be64(8)? != 0 || h.be32(16)? != 0 {
        return Err(InspectError::BackingFile);
    }
    if h.be32(32)? != 0 {
        return Err(InspectError::Encrypted("qcow2 encryption"));
    }
    if version == 2 {
        return Ok(());
    }
    let incompatible = h.be64(72)?;
    const CORRUPT: u64 = 1 << 1;
    const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    const KNOWN: u64 = 0b1_1111; // dirty, corrupt, external data file, compression type, extended L2
    if incompatible & EXTERNAL_DATA_FILE != 0 {
        return Err(InspectError::ExternalDataFile);
    }
    if incompatible & CORRUPT != 0 {
        return Err(malformed(F, "the image is marked corrupt"));
    }
    if incompatible & !KNOWN != 0 {
        return Err(malformed(
            F,
            format!("unknown incompatible features {incompatible:#x}"),
        ));
    }
    // Header extensions follow the header; an external data file also names itself there.
    let header_length = u64::from(h.be32(100)?);
    let cluster_size = 1u64 << h.be32(20)?.min(21);
    let mut offset = header_length;
    while offset + 8 <= cluster_size {
        let ext = bytes(image, offset, 8)?;
        let e = Fields {
            format: F,
            data: &ext,
        };
        let (kind, len) = (e.be32(0)?, u64::from(e.be32(4)?));
        match kind {
            0 => break,
            0x4441_5441 => return Err(InspectError::ExternalDataFile),
            0x0537_be77 => return Err(InspectError::Encrypted("qcow2 full disk encryption")),
            _ => {}
        }
        offset += 8 + len.div_ceil(8) * 8;
    }
    Ok(())
}

/// GUIDs as VHDX stores them: the first three fields little-endian.
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

const VHDX_METADATA_REGION: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const VHDX_BAT_REGION: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const VHDX_FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VHDX_PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

/// VHDX: not a differencing disk (no HasParent flag, no parent locator), no unknown required
/// regions.
fn check_vhdx(image: &(impl ReadAt + ?Sized)) -> Result<(), InspectError> {
    const F: &str = "vhdx";
    const KIB: u64 = 1024;
    // Two copies of the region table; the first with a valid signature is used.
    let mut table = None;
    for at in [192 * KIB, 256 * KIB] {
        let data = bytes(image, at, 64 * KIB as usize)?;
        if data.starts_with(b"regi") {
            table = Some(data);
            break;
        }
    }
    let table = table.ok_or_else(|| malformed(F, "no region table"))?;
    let t = Fields {
        format: F,
        data: &table,
    };
    let count = t.le32(8)?;
    if count > 2047 {
        return Err(malformed(
            F,
            format!("{count} region table entries (at most 2047)"),
        ));
    }
    let mut metadata = None;
    for i in 0..count as usize {
        let at = 16 + i * 32;
        let id: [u8; 16] = t.array(at)?;
        let (offset, length, required) = (t.le64(at + 16)?, t.le32(at + 24)?, t.le32(at + 28)? & 1);
        if id == VHDX_METADATA_REGION {
            metadata = Some((offset, length));
        } else if id != VHDX_BAT_REGION && required != 0 {
            return Err(malformed(F, "a required region qemu-img does not know"));
        }
    }
    let (region, length) = metadata.ok_or_else(|| malformed(F, "no metadata region"))?;
    let data = bytes(image, region, (length as usize).min(64 * KIB as usize))?;
    if !data.starts_with(b"metadata") {
        return Err(malformed(F, "no metadata table"));
    }
    let m = Fields {
        format: F,
        data: &data,
    };
    let entries = m.le16(10)?;
    if entries > 2047 {
        return Err(malformed(
            F,
            format!("{entries} metadata entries (at most 2047)"),
        ));
    }
    for i in 0..entries as usize {
        let at = 32 + i * 32;
        let id: [u8; 16] = m.array(at)?;
        if id == VHDX_PARENT_LOCATOR {
            return Err(InspectError::Differencing);
        }
        if id == VHDX_FILE_PARAMETERS {
            let item = u64::from(m.le32(at + 16)?);
            let params = bytes(image, region.saturating_add(item), 8)?;
            let flags = Fields {
                format: F,
                data: &params,
            }
            .le32(4)?;
            const HAS_PARENT: u32 = 1 << 1;
            if flags & HAS_PARENT != 0 {
                return Err(InspectError::Differencing);
            }
        }
    }
    Ok(())
}

/// How much text qemu reads at byte 512 of a sparse VMDK for its parent and CIDs (20 sectors).
const VMDK_QEMU_DESCRIPTOR: usize = 20 * 512;

/// VMDK: a single-file sparse extent (monolithicSparse or streamOptimized) without a parent,
/// judged by the rules qemu's vmdk driver reads it with (block/vmdk.c), not by the VMDK
/// specification, because qemu-img is what opens it:
///
/// - qemu opens a sparse extent whose header says capacity 0 and names an embedded descriptor as
///   a *descriptor file*, and opens every extent line in that text, wherever it points. Such a
///   header is refused outright.
/// - Otherwise it serves the extent itself, then takes a parent from the 10 KiB at byte 512 —
///   not from where the header puts the descriptor — at the first occurrence of
///   `parentFileNameHint` anywhere in that text (a comment, the middle of a word), and opens it.
///   Any occurrence, there or in the header's descriptor, is refused.
/// - It finds keys by substring, not by line: `createType` is whatever follows the first
///   occurrence of the word and two more characters. discus wants exactly one occurrence, spelled
///   `createType="…"`, naming monolithicSparse or streamOptimized; anything else is ambiguous.
/// - qemu stops reading at a NUL byte; discus judges the text after it too.
///
/// `qemu-img info`'s extent list is checked again after inspection.
fn check_vmdk(image: &(impl ReadAt + ?Sized)) -> Result<(), InspectError> {
    const F: &str = "vmdk";
    let header = bytes(image, 0, 512)?;
    let h = Fields {
        format: F,
        data: &header,
    };
    let version = h.le32(4)?;
    if !(1..=3).contains(&version) {
        return Err(malformed(F, format!("version {version}")));
    }
    let (capacity, offset, size) = (h.le64(12)?, h.le64(28)?, h.le64(36)?);
    if capacity == 0 {
        return Err(InspectError::VmdkZeroCapacity);
    }
    let fixed = bytes(image, 512, VMDK_QEMU_DESCRIPTOR)?;
    check_vmdk_parent(&fixed)?;
    if offset == 0 || size == 0 {
        // No embedded descriptor: qemu-img reads the extent alone.
        return Ok(());
    }
    let length = size.saturating_mul(512).min(1 << 20) as usize;
    let descriptor = bytes(image, offset.saturating_mul(512), length)?;
    check_vmdk_parent(&descriptor)?;
    check_vmdk_create_type(&descriptor)
}

/// Where `needle` occurs in `text`.
fn occurrences<'a>(text: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    text.windows(needle.len())
        .enumerate()
        .filter(move |(_, window)| *window == needle)
        .map(|(at, _)| at)
}

/// No parent file name anywhere, and every `parentCID` says "none".
fn check_vmdk_parent(text: &[u8]) -> Result<(), InspectError> {
    if occurrences(text, b"parentFileNameHint").next().is_some() {
        return Err(InspectError::VmdkParent);
    }
    for at in occurrences(text, b"parentCID") {
        let value = &text[at + b"parentCID".len()..];
        let none = value
            .strip_prefix(b"=")
            .and_then(|v| v.get(..8))
            .is_some_and(|v| v.eq_ignore_ascii_case(b"ffffffff"));
        if !none {
            return Err(InspectError::VmdkParent);
        }
    }
    Ok(())
}

/// Exactly one `createType="…"`, for a type that is a single sparse file.
fn check_vmdk_create_type(text: &[u8]) -> Result<(), InspectError> {
    const KEY: &[u8] = b"createType";
    let mut found = occurrences(text, KEY);
    let (Some(at), None) = (found.next(), found.next()) else {
        return Err(InspectError::VmdkAmbiguous(
            "it must name createType exactly once".into(),
        ));
    };
    let spelled =
        || InspectError::VmdkAmbiguous("createType must be written createType=\"…\"".into());
    let rest = text[at + KEY.len()..]
        .strip_prefix(b"=\"")
        .ok_or_else(spelled)?;
    let end = rest.iter().position(|b| *b == b'"').ok_or_else(spelled)?;
    let value = &rest[..end];
    match value {
        b"monolithicSparse" | b"streamOptimized" => Ok(()),
        // Shown in status: no control characters (no forged lines), and not much of it.
        other => Err(InspectError::VmdkCreateType(
            String::from_utf8_lossy(other)
                .chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2_header(version: u32, backing: u64, crypt: u32, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[8..16].copy_from_slice(&backing.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[32..36].copy_from_slice(&crypt.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    #[test]
    fn detects_formats_by_magic() {
        assert_eq!(
            detect(&qcow2_header(3, 0, 0, 0)[..]).ok(),
            Some(Format::Qcow2)
        );
        let mut iso = vec![0u8; 0x9000];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(detect(&iso[..]).ok(), Some(Format::Iso));
        assert_eq!(detect(&[0u8; 4096][..]).ok(), Some(Format::Raw));
        assert_eq!(detect(&[][..]).ok(), Some(Format::Raw));
        assert!(matches!(
            detect(&b"\x1f\x8b\x08\0"[..]),
            Err(InspectError::Compressed("gzip"))
        ));
        assert!(matches!(
            detect(&b"\xfd7zXZ\0\0"[..]),
            Err(InspectError::Compressed("xz"))
        ));
        assert!(matches!(
            detect(&b"LUKS\xba\xbe\0\x02"[..]),
            Err(InspectError::Encrypted(_))
        ));
        assert!(matches!(
            detect(&b"# Disk DescriptorFile\nversion=1\n"[..]),
            Err(InspectError::VmdkDescriptor)
        ));
        let mut vhd = vec![0u8; 4096];
        vhd[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert!(matches!(
            detect(&vhd[..]),
            Err(InspectError::Unsupported(_))
        ));
    }

    #[test]
    fn qcow2_headers_that_reach_other_files_are_refused() {
        assert!(inspect(&qcow2_header(3, 0, 0, 0)[..], ImageFormat::Auto).is_ok());
        assert!(inspect(&qcow2_header(2, 0, 0, 0)[..], ImageFormat::Qcow2).is_ok());
        let cases = [
            (qcow2_header(3, 4096, 0, 0), "backing file"),
            (qcow2_header(3, 0, 1, 0), "encrypted"),
            (qcow2_header(3, 0, 0, 1 << 2), "external data file"),
            (qcow2_header(3, 0, 0, 1 << 1), "corrupt"),
            (qcow2_header(3, 0, 0, 1 << 40), "unknown incompatible"),
            (qcow2_header(4, 0, 0, 0), "version 4"),
        ];
        for (header, expected) in cases {
            let error = inspect(&header[..], ImageFormat::Auto)
                .expect_err(expected)
                .to_string();
            assert!(error.contains(expected), "{error}");
        }
        let mut with_extension = qcow2_header(3, 0, 0, 0);
        with_extension[112..116].copy_from_slice(&0x4441_5441u32.to_be_bytes());
        with_extension[116..120].copy_from_slice(&9u32.to_be_bytes());
        assert!(matches!(
            inspect(&with_extension[..], ImageFormat::Auto),
            Err(InspectError::ExternalDataFile)
        ));
    }

    #[test]
    fn a_declared_format_must_match() {
        let qcow2 = qcow2_header(3, 0, 0, 0);
        let error = inspect(&qcow2[..], ImageFormat::Raw).expect_err("mismatch");
        assert_eq!(
            error.to_string(),
            "spec.format is raw but the image is qcow2"
        );
        assert!(inspect(&[0u8; 1024][..], ImageFormat::Iso).is_err());
        assert!(inspect(&[0u8; 1024][..], ImageFormat::Qcow2).is_err());
        let mut iso = vec![0u8; 0x9000];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(
            inspect(&iso[..], ImageFormat::Raw).ok(),
            Some(Format::Iso),
            "an ISO is a raw disc image"
        );
    }

    /// A sparse VMDK header (capacity in sectors, descriptor at `desc_sector`) with `at_512` at
    /// byte 512 and `descriptor` at the header's descriptor sector.
    fn vmdk(capacity: u64, desc_sector: u64, at_512: &str, descriptor: &str) -> Vec<u8> {
        let mut image = vec![0u8; 64 * 512];
        image[0..4].copy_from_slice(b"KDMV");
        image[4..8].copy_from_slice(&1u32.to_le_bytes());
        image[12..20].copy_from_slice(&capacity.to_le_bytes());
        image[28..36].copy_from_slice(&desc_sector.to_le_bytes());
        image[36..44].copy_from_slice(&20u64.to_le_bytes());
        image[512..512 + at_512.len()].copy_from_slice(at_512.as_bytes());
        let at = desc_sector as usize * 512;
        image[at..at + descriptor.len()].copy_from_slice(descriptor.as_bytes());
        image
    }

    #[test]
    fn vmdk_descriptors_are_read_the_way_qemu_reads_them() {
        let head = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n";
        let sparse = format!("{head}createType=\"monolithicSparse\"\n");
        assert!(inspect(&vmdk(2048, 1, "", &sparse)[..], ImageFormat::Vmdk).is_ok());
        let refused = |image: Vec<u8>| inspect(&image[..], ImageFormat::Auto).expect_err("refused");
        assert!(matches!(
            refused(vmdk(0, 1, "", &sparse)),
            InspectError::VmdkZeroCapacity
        ));
        for parent in [
            format!("{sparse}# parentFileNameHint=\"/etc/passwd\"\n"),
            format!("{sparse}xparentFileNameHintx=\"/etc/passwd\"\n"),
            format!("{head}parentCID=12345678\ncreateType=\"monolithicSparse\"\n"),
        ] {
            assert!(
                matches!(
                    refused(vmdk(2048, 1, "", &parent)),
                    InspectError::VmdkParent
                ),
                "{parent}"
            );
        }
        // qemu looks for the parent at byte 512 whatever the header says.
        let hint = format!("{sparse}parentFileNameHint=\"/etc/passwd\"\n");
        assert!(matches!(
            refused(vmdk(2048, 40, &hint, &sparse)),
            InspectError::VmdkParent
        ));
        for ambiguous in [
            format!("{head}# createType=\"monolithicFlat\"\ncreateType=\"monolithicSparse\"\n"),
            format!("{head}createType = \"monolithicSparse\"\n"),
            head.to_owned(),
        ] {
            assert!(
                matches!(
                    refused(vmdk(2048, 1, "", &ambiguous)),
                    InspectError::VmdkAmbiguous(_)
                ),
                "{ambiguous}"
            );
        }
        let flat = format!("{head}createType=\"monolithic\nFlat\x1b\"\n");
        let error = refused(vmdk(2048, 1, "", &flat));
        assert_eq!(
            error.to_string(),
            "the VMDK's createType is \"monolithicFlat\"; only monolithicSparse and \
             streamOptimized are served"
        );
    }

    #[test]
    fn truncated_headers_are_malformed_not_panics() {
        for format in [&b"QFI\xfb\0\0\0\x03"[..], b"vhdxfile", b"KDMV\x01\0\0\0"] {
            for len in 0..=format.len() {
                let _ = inspect(&format[..len], ImageFormat::Auto);
            }
            assert!(matches!(
                inspect(format, ImageFormat::Auto),
                Err(InspectError::Malformed { .. })
            ));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn random_images_never_panic(
            magic in proptest::sample::select(vec![&b"QFI\xfb"[..], b"vhdxfile", b"KDMV", b"", b"# Disk DescriptorFile"]),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            pad in 0usize..300_000,
        ) {
            let mut image = magic.to_vec();
            image.extend_from_slice(&body);
            let _ = inspect(&image[..], ImageFormat::Auto);
            // The same bytes behind the VHDX region table and the qcow2 extension area.
            image.resize(image.len() + pad, 0);
            image.extend_from_slice(&body);
            let _ = inspect(&image[..], ImageFormat::Auto);
        }

        #[test]
        fn random_vhdx_tables_never_panic(
            entries in proptest::collection::vec((proptest::prelude::any::<[u8; 16]>(), 0u64..600_000, 0u32..70_000, 0u32..2), 0..4),
            metadata in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            count in 0u32..3000,
        ) {
            let mut image = vec![0u8; 320 * 1024];
            image[..8].copy_from_slice(b"vhdxfile");
            let table = 192 * 1024;
            image[table..table + 4].copy_from_slice(b"regi");
            image[table + 8..table + 12].copy_from_slice(&count.min(entries.len() as u32 + 1).to_le_bytes());
            for (i, (id, offset, length, required)) in entries.iter().enumerate() {
                let at = table + 16 + i * 32;
                let id = if i == 0 { VHDX_METADATA_REGION } else { *id };
                image[at..at + 16].copy_from_slice(&id);
                image[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
                image[at + 24..at + 28].copy_from_slice(&length.to_le_bytes());
                image[at + 28..at + 32].copy_from_slice(&required.to_le_bytes());
                if let Ok(start) = usize::try_from(*offset) && start + 8 < image.len() {
                    image[start..start + 8].copy_from_slice(b"metadata");
                    let end = (start + 8 + metadata.len()).min(image.len());
                    image[start + 8..end].copy_from_slice(&metadata[..end - start - 8]);
                }
            }
            let _ = inspect(&image[..], ImageFormat::Auto);
        }
    }
}
