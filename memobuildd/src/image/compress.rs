//! Layer compression, done lazily: a layer is stored as its plain tar (its blob digest is
//! its diff-id), and the gzip or zstd form an export, a push or a remote needs is made from
//! it then, once per form (the store keeps each form it made: `store::Lease::layer_as`).
//!
//! The bytes of a form depend only on the tar and the form (format and level), so the same
//! layer exported twice, or on two machines, gets the same digest.

use std::io::{self, Write};

use super::oci::MediaTypes;

/// zlib level 1 for the blocks worth compressing. Measured on 210 MB of mixed files (2-core
/// shared machine, release): level 6 (Docker's and containerd's choice) compresses at
/// ~130 MB/s to 29% of the tar, level 1 at ~260 MB/s to 34%. Compression sits on the critical
/// path of every edit-and-rebuild (a profile of a 100 MB COPY showed deflate at two thirds of
/// the step), which is the loop MemoBuild exists to make fast; 16% larger blobs on push are the
/// price.
///
/// Level 1 (zlib-rs's `deflate_quick`) codes literals with deflate's fixed Huffman table, so it
/// gains only from repeats: on incompressible data (archives, jars, media) it runs at ~93 MB/s
/// and grows the data by 5.5%. [`gzip::GzipWriter`] stores such blocks instead. Measured
/// (release, 8 KiB writes, same machine): 256 MiB of random bytes now go at ~800 MB/s and grow
/// by 0.01%; 256 MiB of source text at 318 MB/s instead of 334 (the byte histogram costs 5%),
/// to the same size; a 1.25 GB tar of /usr/lib, /usr/share and crate archives at 213 MB/s
/// instead of 193, and 0.6% smaller.
const GZIP_LEVEL: u32 = 1;

/// zstd's level when none is asked for, as `zstd` and buildx use.
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;

/// A form of a layer's tar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    Uncompressed,
    /// Level 1, with blocks of packed data stored (see [`GZIP_LEVEL`]).
    #[default]
    Gzip,
    Zstd {
        level: i32,
    },
}

impl Compression {
    /// What the store calls this form: `tar`, `gzip`, `zstd-3`.
    pub fn form(self) -> String {
        match self {
            Self::Uncompressed => "tar".into(),
            Self::Gzip => "gzip".into(),
            Self::Zstd { level } => format!("zstd-{level}"),
        }
    }

    /// A layer of this form, as `media` names it (zstd has an OCI type only, which Docker
    /// accepts too).
    pub fn layer_media_type(self, media: MediaTypes) -> &'static str {
        match self {
            Self::Uncompressed => media.layer_tar(),
            Self::Gzip => media.layer_gzip(),
            Self::Zstd { .. } => super::oci::OCI_LAYER_ZSTD,
        }
    }

    /// Whether a layer of media type `media_type` is already in this format (any level).
    pub fn matches(self, media_type: &str) -> bool {
        match self {
            Self::Uncompressed => media_type.ends_with(".tar"),
            Self::Gzip => media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip"),
            Self::Zstd { .. } => media_type.ends_with("+zstd"),
        }
    }
}

/// The compression stage of a tar being written.
pub(crate) enum Compressor<W: Write> {
    None(W),
    Gzip(Box<gzip::GzipWriter<W>>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Compressor<W> {
    pub(crate) fn new(out: W, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::Uncompressed => Self::None(out),
            Compression::Gzip => Self::Gzip(Box::new(gzip::GzipWriter::new(out))),
            Compression::Zstd { level } => {
                let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
                // The frame holds its size-less content checksum, as `zstd` writes by default;
                // the bytes depend on the input and the level only.
                encoder.include_checksum(true)?;
                Self::Zstd(encoder)
            }
        })
    }

    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Self::None(out) => Ok(out),
            Self::Gzip(encoder) => encoder.finish(),
            Self::Zstd(encoder) => encoder.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::None(out) => out.write(buf),
            Self::Gzip(encoder) => encoder.write(buf),
            Self::Zstd(encoder) => encoder.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::None(out) => out.flush(),
            Self::Gzip(encoder) => encoder.flush(),
            Self::Zstd(encoder) => encoder.flush(),
        }
    }
}

/// A gzip writer that stores what level 1 cannot shrink.
mod gzip {
    use std::io::{self, Write};
    use std::mem;

    use flate2::{Compress, Compression, Crc, FlushCompress, Status};

    use super::GZIP_LEVEL;

    /// Input is judged, then stored or compressed, a block of this many bytes at a time: enough
    /// for a steady byte histogram and a negligible stored-block framing (15 bytes per block),
    /// few enough to follow a tar from a text file to an archive.
    const BLOCK: usize = 128 << 10;

    /// Order-0 entropy, in bits per byte, from which a block is stored rather than compressed
    /// at [`GZIP_LEVEL`]. Level 1 gains nothing from skewed byte frequencies (its literals use
    /// deflate's fixed Huffman table), so entropy only tells structured data from packed data,
    /// and the cut sits where level 1 stops paying. Measured per block on a 1.25 GB tar of
    /// /usr/lib, /usr/share and cargo's crate cache: level 1 shrank blocks at 7.75-7.80 bits by
    /// 9%, at 7.90-7.95 by 2%, grew those at 7.96-7.98 by 2% and those from 7.99 (archives) by
    /// 5%. Of the cuts tried from 7.0 to 7.99, 7.95 gave the smallest total but for 7.96 (0.01%
    /// smaller): 0.62% smaller than level 1 on every block. A cut at 7.76 (where an ideal byte
    /// code would save under 3%) would store blocks level 1 shrinks by 9%. Random bytes measure
    /// 7.998 in a full block; a random tail under ~4 KiB measures below the cut and is
    /// compressed, at the cost of a few bytes.
    ///
    /// The entropy is taken over the block's literals: bytes that repeat their predecessor
    /// are left out, because level 1 codes runs as cheap matches. A tar of small packed files
    /// is ~96% random bytes and ~4% zero runs (headers and padding): its order-0 entropy
    /// (7.92) looks compressible, yet level 1 makes it ~2% bigger at a tenth of the speed.
    const STORE_ENTROPY: f64 = 7.95;

    /// The share of a block in runs (bytes equal to their predecessor) from which level 1
    /// is worth its cost with random literals: runs shrink to almost nothing while each
    /// literal costs 5.5% extra (fixed Huffman codes average 8.44 bits). Under 8% runs,
    /// level 1 saves under 3% at a tenth of storing's speed; a tar of 20 KiB random files
    /// has ~3.5%.
    const RUN_SHARE_TO_DEFLATE: f64 = 0.08;

    /// The most a stored deflate block holds: its LEN field has 16 bits (RFC 1951 §3.2.4).
    const STORED_MAX: usize = u16::MAX as usize;

    /// The gzip member header (RFC 1952) `flate2::write::GzEncoder` writes at level 1: deflate,
    /// no flags, no name, mtime 0 (the bytes depend on the content only), XFL 4 ("fastest"),
    /// OS 255 ("unknown").
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];

    /// One gzip member whose deflate stream holds, block by block, zlib's compressed blocks or
    /// stored ones. The output depends only on the bytes written, not on how they were split
    /// into writes: blocks always start at the same offsets.
    ///
    /// Stored blocks are framed here rather than by zlib at level 0: with the zlib-rs backend,
    /// `Compress::set_level` fails with a stream error once any input has gone in (it hands
    /// zlib-rs's `params` no output buffer for the flush a change of level needs).
    pub(crate) struct GzipWriter<W: Write> {
        out: W,
        deflate: Compress,
        crc: Crc,
        /// Input short of a block, or a full block waiting for the next write or `finish`.
        pending: Vec<u8>,
        /// Output not yet handed to `out`; handed over a block's worth at a time.
        buf: Vec<u8>,
        /// `deflate` took input since its last full flush, so a stored block cannot follow yet.
        deflating: bool,
    }

    impl<W: Write> GzipWriter<W> {
        pub(crate) fn new(out: W) -> Self {
            // Room for a block's worth plus one stored block, so `buf` never grows.
            let mut buf = Vec::with_capacity(2 * BLOCK);
            buf.extend_from_slice(&HEADER);
            Self {
                out,
                deflate: Compress::new(Compression::new(GZIP_LEVEL), false),
                crc: Crc::new(),
                pending: Vec::with_capacity(BLOCK),
                buf,
                deflating: false,
            }
        }

        /// Writes what is pending, the end of the deflate stream and the trailer.
        pub(crate) fn finish(mut self) -> io::Result<W> {
            self.write_pending()?;
            self.deflate(&[], FlushCompress::Finish)?;
            self.buf.extend_from_slice(&self.crc.sum().to_le_bytes());
            // ISIZE: the input's length modulo 2^32.
            self.buf.extend_from_slice(&self.crc.amount().to_le_bytes());
            self.out.write_all(&self.buf)?;
            Ok(self.out)
        }

        fn write_pending(&mut self) -> io::Result<()> {
            if self.pending.is_empty() {
                return Ok(());
            }
            let block = mem::take(&mut self.pending);
            let written = self.write_block(&block);
            self.pending = block;
            self.pending.clear();
            written
        }

        fn write_block(&mut self, block: &[u8]) -> io::Result<()> {
            self.crc.update(block);
            if !worth_storing(block) {
                self.deflating = true;
                return self.deflate(block, FlushCompress::None);
            }
            if self.deflating {
                // Byte-aligns the stream and drops zlib's history: what it compresses next
                // must not refer back across stored bytes it never saw.
                self.deflate(&[], FlushCompress::Full)?;
                self.deflating = false;
            }
            for chunk in block.chunks(STORED_MAX) {
                self.drain()?;
                let len = u16::try_from(chunk.len()).expect("a chunk holds at most STORED_MAX");
                // BFINAL 0 and BTYPE 00 (stored), then padding to the byte boundary.
                self.buf.push(0);
                self.buf.extend_from_slice(&len.to_le_bytes());
                self.buf.extend_from_slice(&(!len).to_le_bytes());
                self.buf.extend_from_slice(chunk);
            }
            Ok(())
        }

        /// Runs zlib until it has taken all of `input` and, for a flush, written all it owes.
        fn deflate(&mut self, mut input: &[u8], flush: FlushCompress) -> io::Result<()> {
            loop {
                self.drain()?;
                let before = self.deflate.total_in();
                let status = self
                    .deflate
                    .compress_vec(input, &mut self.buf, flush)
                    .map_err(io::Error::other)?;
                let taken = usize::try_from(self.deflate.total_in() - before)
                    .expect("zlib takes at most the input it was given");
                input = &input[taken..];
                let done = match flush {
                    FlushCompress::None => input.is_empty(),
                    FlushCompress::Finish => status == Status::StreamEnd,
                    // A flush is complete once zlib leaves output room unused.
                    _ => self.buf.len() < self.buf.capacity(),
                };
                if done {
                    return Ok(());
                }
            }
        }

        /// Hands `out` what has piled up once it is a block's worth, which leaves at least a
        /// block of room in `buf`.
        fn drain(&mut self) -> io::Result<()> {
            if self.buf.len() >= BLOCK {
                self.out.write_all(&self.buf)?;
                self.buf.clear();
            }
            Ok(())
        }
    }

    impl<W: Write> Write for GzipWriter<W> {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            // A full block is compressed by the next call, so that an error from it comes from
            // a call that took none of its `data`, as `Write::write` promises.
            if self.pending.len() == BLOCK {
                self.write_pending()?;
            }
            if self.pending.is_empty() && data.len() >= BLOCK {
                // Straight from the caller's buffer, saving a copy.
                self.write_block(&data[..BLOCK])?;
                return Ok(BLOCK);
            }
            let taken = data.len().min(BLOCK - self.pending.len());
            self.pending.extend_from_slice(&data[..taken]);
            Ok(taken)
        }

        // Input short of a block stays pending: compressing it now would make the output
        // depend on when flush was called.
        fn flush(&mut self) -> io::Result<()> {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
            self.out.flush()
        }
    }

    /// Whether level 1 would not shrink `block` enough to pay: random literals, few runs.
    fn worth_storing(block: &[u8]) -> bool {
        let (literals, runs) = literal_counts(block);
        let run_share = runs as f64 / block.len().max(1) as f64;
        run_share < RUN_SHARE_TO_DEFLATE && entropy(&literals) >= STORE_ENTROPY
    }

    /// Byte counts of the bytes that do not repeat their predecessor (approximately), and how
    /// many do.
    fn literal_counts(block: &[u8]) -> ([u32; 256], u64) {
        // Four tables, so that a run of one byte does not make each increment wait for the
        // previous one to land in the same counter.
        let mut counts = [[0u32; 256]; 4];
        let (quads, rest) = block.as_chunks::<4>();
        for &[a, b, c, d] in quads {
            counts[0][usize::from(a)] += 1;
            counts[1][usize::from(b)] += 1;
            counts[2][usize::from(c)] += 1;
            counts[3][usize::from(d)] += 1;
        }
        for &byte in rest {
            counts[0][usize::from(byte)] += 1;
        }
        let mut literals = [0u32; 256];
        for (byte, count) in literals.iter_mut().enumerate() {
            *count = counts.iter().map(|table| table[byte]).sum();
        }
        // Counted without a branch per byte, so it vectorizes. The runs are taken from the
        // most common byte: in the blocks this decides on (packed files in a tar) they are
        // the zeros of headers and padding, which are that byte.
        let pairs = block.iter().zip(block.iter().skip(1));
        let runs: u32 = pairs.map(|(a, b)| u32::from(a == b)).sum();
        if let Some(top) = literals.iter_mut().max() {
            *top -= runs.min(*top);
        }
        (literals, u64::from(runs))
    }

    /// Order-0 entropy of a byte histogram, in bits per byte.
    fn entropy(counts: &[u32; 256]) -> f64 {
        let len = counts.iter().map(|&c| f64::from(c)).sum::<f64>();
        counts
            .iter()
            .filter(|&&count| count > 0)
            .map(|&count| {
                let p = f64::from(count) / len;
                -p * p.log2()
            })
            .sum()
    }

    #[cfg(test)]
    mod tests {
        use std::io::Read;
        use std::process::Command;

        use super::*;

        fn random(len: usize, mut seed: u64) -> Vec<u8> {
            let mut out = Vec::with_capacity(len + 8);
            while out.len() < len {
                // xorshift64
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                out.extend_from_slice(&seed.to_le_bytes());
            }
            out.truncate(len);
            out
        }

        /// Lines of words drawn from a small vocabulary: compresses well, like source code.
        fn text(len: usize, seed: u64) -> Vec<u8> {
            const WORDS: [&str; 16] = [
                "layer",
                "the",
                "build",
                "cache",
                "of",
                "and",
                "snapshot",
                "fn",
                "let",
                "mut",
                "digest",
                "to",
                "io::Result",
                "Ok(())",
                "{",
                "}",
            ];
            let mut out = Vec::with_capacity(len + 16);
            for (i, pick) in random(len, seed).into_iter().enumerate() {
                if out.len() >= len {
                    break;
                }
                out.extend_from_slice(WORDS[usize::from(pick % 16)].as_bytes());
                out.push(if i % 9 == 8 { b'\n' } else { b' ' });
            }
            out.truncate(len);
            out
        }

        /// 200 KB of random bytes, 200 KB of text, and so on: both kinds of block, both ways
        /// round.
        fn mixed(len: usize) -> Vec<u8> {
            let mut out = Vec::with_capacity(len);
            for part in 0u64.. {
                if out.len() >= len {
                    break;
                }
                let kind = if part % 2 == 0 { random } else { text };
                out.extend_from_slice(&kind(200_000, part + 1));
            }
            out.truncate(len);
            out
        }

        /// Whole blocks of random bytes and text in turn: the stream switches both ways.
        fn alternating() -> Vec<u8> {
            [
                random(BLOCK, 3),
                text(BLOCK, 3),
                random(BLOCK, 4),
                text(BLOCK, 4),
            ]
            .concat()
        }

        /// Gzips `data` written in pieces whose sizes cycle through `sizes`.
        fn gzip(data: &[u8], sizes: &[usize]) -> Vec<u8> {
            let mut writer = GzipWriter::new(Vec::new());
            let mut rest = data;
            for &size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, tail) = rest.split_at(size.min(rest.len()));
                writer.write_all(piece).expect("write");
                rest = tail;
            }
            writer.finish().expect("finish")
        }

        fn gunzip(gz: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(gz)
                .read_to_end(&mut out)
                .expect("a valid gzip stream");
            out
        }

        #[test]
        fn round_trips() {
            let cases = [
                ("empty", Vec::new()),
                ("one byte", vec![42]),
                ("a block", random(BLOCK, 7)),
                ("a block and a byte", random(BLOCK + 1, 7)),
                ("random", random(1_000_000, 7)),
                ("text", text(1_000_000, 7)),
                ("mixed", mixed(1_000_000)),
                ("alternating", alternating()),
            ];
            for (name, data) in cases {
                let gz = gzip(&data, &[usize::MAX]);
                assert_eq!(gunzip(&gz), data, "{name}");
                let mut multi = Vec::new();
                flate2::read::MultiGzDecoder::new(&gz[..])
                    .read_to_end(&mut multi)
                    .expect("a valid gzip stream");
                assert_eq!(multi, data, "{name}");
            }
        }

        #[test]
        fn the_output_does_not_depend_on_how_writes_are_split() {
            let data = mixed(1_000_000);
            let whole = gzip(&data, &[usize::MAX]);
            for sizes in [&[1][..], &[7], &[BLOCK - 1], &[1, 7, BLOCK - 1, 300_000]] {
                assert!(gzip(&data, sizes) == whole, "{sizes:?}");
            }
        }

        #[test]
        fn the_header_and_an_empty_stream_are_what_gz_encoder_writes() {
            let level = flate2::Compression::new(GZIP_LEVEL);
            let encoder = flate2::write::GzEncoder::new(Vec::new(), level);
            assert_eq!(gzip(&[], &[1]), encoder.finish().expect("finish"));
            assert_eq!(gzip(&text(1000, 3), &[1])[..10], HEADER);
        }

        #[test]
        fn random_blocks_are_stored_and_text_is_compressed() {
            let data = random(1_000_000, 11);
            let gz = gzip(&data, &[usize::MAX]);
            assert!(gz.len() <= data.len() + data.len() / 1000, "{}", gz.len());
            let data = text(1_000_000, 11);
            let gz = gzip(&data, &[usize::MAX]);
            assert!(gz.len() < data.len() * 4 / 10, "{}", gz.len());
            // Random blocks stored, text blocks compressed.
            let gz = gzip(&alternating(), &[usize::MAX]);
            assert!(gz.len() < 2 * BLOCK + 2 * BLOCK * 4 / 10, "{}", gz.len());
            // Switches mid-block too: smaller than level 1 throughout, which grows random data.
            let data = mixed(1_000_000);
            let gz = gzip(&data, &[usize::MAX]);
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(GZIP_LEVEL));
            encoder.write_all(&data).expect("write");
            let level_1 = encoder.finish().expect("finish").len();
            assert!(gz.len() < level_1, "{} vs {level_1}", gz.len());
        }

        #[test]
        fn gnu_gzip_reads_the_output() {
            let data = [mixed(1_000_000), alternating()].concat();
            let file = tempfile::NamedTempFile::new().expect("temp file");
            std::fs::write(file.path(), gzip(&data, &[usize::MAX])).expect("write");
            let gzip = |arg| {
                let output = Command::new("gzip")
                    .arg(arg)
                    .arg(file.path())
                    .output()
                    .expect("run gzip (in every Debian base system)");
                assert!(output.status.success(), "gzip {arg}: {output:?}");
                output.stdout
            };
            gzip("-t");
            assert!(gzip("-dc") == data);
        }

        #[test]
        fn entropy_spans_zero_to_eight_bits() {
            let of = |block: &[u8]| entropy(&literal_counts(block).0);
            assert_eq!(of(&[7; 1000]), 0.0);
            assert!((of(&[0, 1, 0, 1, 0, 1, 0, 1]) - 1.0).abs() < 1e-9);
            let all: Vec<u8> = (0..=255).collect();
            assert!((of(&all.repeat(4)) - 8.0).abs() < 1e-9);
            assert!(of(&random(BLOCK, 5)) > STORE_ENTROPY);
            assert!(of(&text(BLOCK, 5)) < STORE_ENTROPY);
            assert!(worth_storing(&random(BLOCK, 5)));
            assert!(!worth_storing(&text(BLOCK, 5)));
        }

        #[test]
        fn a_tar_of_small_random_files_is_stored_and_one_with_more_padding_deflated() {
            // 20 KiB random files, each after a 512-byte header of zeros but a name.
            let tar_like = |file: usize| {
                let mut block = Vec::new();
                let mut seed = 9;
                while block.len() < BLOCK {
                    let mut header = vec![0u8; 512];
                    header[..8].copy_from_slice(b"src/file");
                    block.extend_from_slice(&header);
                    block.extend_from_slice(&random(file, seed));
                    seed += 1;
                }
                block.truncate(BLOCK);
                block
            };
            let packed = tar_like(20 << 10);
            assert!(worth_storing(&packed));
            let level1 = {
                let mut deflate = Compress::new(Compression::new(GZIP_LEVEL), false);
                let mut out = Vec::with_capacity(2 * BLOCK);
                deflate
                    .compress_vec(&packed, &mut out, FlushCompress::Finish)
                    .expect("deflate");
                out.len()
            };
            assert!(level1 > packed.len(), "level 1 would grow it: {level1}");
            // 2 KiB files: a fifth of the block is header zeros, which level 1 removes.
            assert!(!worth_storing(&tar_like(2 << 10)));
        }
    }
}
