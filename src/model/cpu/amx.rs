//! The bf16 product on AMX tiles (Intel's Advanced Matrix Extensions, Sapphire Rapids and later
//! Xeons), for `--dtype bf16`.
//!
//! AMX adds eight tile registers of up to 16 rows × 64 bytes and `tdpbf16ps`, which multiplies
//! a 16 × 32 bf16 tile `A` by a 32 × 16 bf16 tile `B` into a 16 × 16 f32 tile: 16 384 FLOP in
//! one instruction, about 16× what AVX-512 does in f32. `B` is read as 16 rows of 16 (k, k+1)
//! pairs: the layout [`PackedBf16`] already packs its panels in for AVX512-BF16, so one panel of
//! [`NR`] columns over 32 reduction steps is exactly one `B` tile (64-byte rows).
//!
//! Every tile here is 16 × 64 bytes (one configuration, loaded for each work item):
//!
//! ```text
//!            B: tmm6 (panel j)   tmm7 (panel j + 1)
//!  A: tmm4 (rows r0)   tmm0            tmm1
//!     tmm5 (rows r1)   tmm2            tmm3        C += A · B, 32 bf16 deep per step
//! ```
//!
//! [`product`] runs the blocks; where each step's `A` tiles come from is its caller's: rows of
//! a matrix ([`gemm`], for Winograd's channel mixes and the im2col conv), or, for the direct
//! conv, pixels of the zero-bordered input map itself (`DirectConvBf16::forward_tiles`, which
//! copies no receptive fields).
//!
//! Edges without partial tiles: a last block of fewer than 32 rows moves its tiles' first row
//! back so that they end at the last row (rows already written are computed again and not
//! stored); a lone last panel multiplies by itself twice; [`gemm`]'s last partial step reads
//! `A` from a zero-padded copy, and `B` from the zero rows [`PackedBf16`] pads every panel
//! with. Products of fewer than 16 rows are left to the AVX512-BF16 kernel.
//!
//! The instructions are written with `asm!` (Rust's AMX intrinsics are unstable). The driver is
//! generic over [`Tiles`], so the tests run it on a software model of the tile instructions on
//! every CPU — the blocking, the edges and the packing — and on the instructions themselves
//! where the CPU has AMX.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::ops::Range;

use super::bf16::PackedBf16;
use super::gemm::NR;

/// Rows of a tile.
pub(super) const ROWS: usize = 16;
/// bf16 values in a tile row (64 bytes): the reduction depth of one step.
pub(super) const DEPTH: usize = 32;

/// The tile instructions the product is made of, as the driver calls them: on the CPU
/// ([`Hardware`]) or in software (the tests' model). The tiles of the module comment.
pub(super) trait Tiles {
    /// Zeroes the four accumulators (`tmm0..=tmm3`).
    ///
    /// # Safety
    /// The tiles are configured on this thread.
    unsafe fn zero(&mut self);

    /// One step 32 deep: loads `A` tiles from `a[0]` and `a[1]` (16 rows, `lda` bytes apart)
    /// and `B` tiles from `b[0]` and `b[1]` (16 rows, 64 bytes apart), and adds the four
    /// products to the accumulators.
    ///
    /// # Safety
    /// The tiles are configured; each pointer addresses 16 readable rows of 64 bytes.
    unsafe fn step(&mut self, a: [*const u8; 2], lda: usize, b: [*const u8; 2]);

    /// Stores the accumulators as a 32 × 32 f32 block: tile (i, j) at
    /// `out + i·16·ldo + j·64` bytes, rows `ldo` bytes apart.
    ///
    /// # Safety
    /// The tiles are configured; `out` addresses 32 writable rows of 128 bytes, `ldo` apart.
    unsafe fn store(&mut self, out: *mut u8, ldo: usize);
}

/// True when the AMX kernel can run: the CPU has AMX-TILE and AMX-BF16, the OS saves the tile
/// state, and Linux granted this process the tile data (asked for here, once: without it the
/// first tile instruction raises SIGILL).
pub fn available() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let (max_leaf, leaf7) = (__cpuid_count(0, 0).eax, __cpuid_count(7, 0));
    let amx_bf16 = leaf7.edx >> 22 & 1 == 1;
    let amx_tile = leaf7.edx >> 24 & 1 == 1;
    if max_leaf < 7 || !amx_bf16 || !amx_tile || !std::arch::is_x86_feature_detected!("xsave") {
        return false;
    }
    // Palette 1 must offer the tiles configured here: 8 of them, 16 rows of 64 bytes (CPUID leaf
    // 0x1D, subleaf 1: EBX bytes per row and tile count, ECX rows; so on every AMX CPU so far).
    let palette = (max_leaf >= 0x1d).then(|| __cpuid_count(0x1d, 1));
    let fits = palette.is_some_and(|p| {
        let (bytes_per_row, tiles, rows) = (p.ebx & 0xffff, p.ebx >> 16, p.ecx & 0xffff);
        bytes_per_row as usize >= DEPTH * 2 && tiles >= 8 && rows as usize >= ROWS
    });
    if !fits {
        tracing::warn!(
            "the CPU has AMX but not 8 tiles of 16 × 64 bytes; bf16 runs on AVX512-BF16"
        );
        return false;
    }
    // The OS must have enabled the tile state in XCR0: bit 17 (the configuration) and bit 18
    // (the data).
    // SAFETY: XGETBV runs where XSAVE is enabled (checked above).
    let xcr0 = unsafe { std::arch::x86_64::_xgetbv(0) };
    if xcr0 >> 17 & 0b11 != 0b11 {
        return false;
    }
    // Linux (5.16 and later) hands out the tile data per process on request.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's permitted xstate.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    } == 0;
    if !granted {
        // A seccomp filter or a sandbox (gVisor), or a thread's signal stack too small for the
        // tile state.
        let error = std::io::Error::last_os_error();
        tracing::warn!(
            %error,
            "the CPU has AMX but Linux refused this process the tile state; bf16 runs on \
             AVX512-BF16"
        );
    }
    granted
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The tiles on the CPU, configured for as long as this value lives (made only where
/// [`available`] is true). Making it loads the configuration; dropping it releases the tiles
/// (`tilerelease`), as Intel asks of code done with them: no tile state outlives a work item,
/// and nothing depends on what a thread did before.
///
/// While one is alive its thread must not run other work that could use the tiles: no rayon
/// call (a job stolen meanwhile could make its own and release the tiles under this one).
#[cfg(target_arch = "x86_64")]
pub(super) struct Hardware(std::marker::PhantomData<*const ()>);

#[cfg(target_arch = "x86_64")]
impl Hardware {
    /// Configures this thread's tiles: palette 1, every tile 16 rows × 64 bytes.
    ///
    /// # Safety
    /// [`available`] returned true.
    pub(super) unsafe fn here() -> Self {
        /// The 64-byte `ldtilecfg` descriptor: byte 0 the palette, then from byte 16 each
        /// tile's bytes per row (u16, little-endian), from byte 48 each tile's rows; tiles 8 to
        /// 15 (absent in palette 1) and the reserved bytes zero.
        #[repr(C, align(64))]
        struct Config([u8; 64]);
        static CONFIG: Config = {
            let mut c = [0u8; 64];
            c[0] = 1;
            let mut t = 0;
            while t < 8 {
                c[16 + 2 * t] = (DEPTH * 2) as u8;
                c[48 + t] = ROWS as u8;
                t += 1;
            }
            Config(c)
        };
        // SAFETY: AMX runs here and the process holds the tile state (the caller's contract);
        // the descriptor is 64 readable bytes.
        unsafe {
            std::arch::asm!(
                "ldtilecfg [{0}]",
                in(reg) CONFIG.0.as_ptr(),
                options(nostack, readonly, preserves_flags)
            )
        };
        // Not `Send`: the configuration belongs to this thread.
        Self(std::marker::PhantomData)
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Hardware {
    fn drop(&mut self) {
        // SAFETY: AMX runs here (a `Hardware` exists); `tilerelease` touches no memory.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    }
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Hardware {
    unsafe fn zero(&mut self) {
        // SAFETY: configured tiles (the caller's contract); no memory is touched.
        unsafe {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem, preserves_flags)
            )
        }
    }

    unsafe fn step(&mut self, a: [*const u8; 2], lda: usize, b: [*const u8; 2]) {
        // SAFETY: configured tiles; each load reads 16 rows of 64 bytes the caller vouched for.
        unsafe {
            std::arch::asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a[0],
                a1 = in(reg) a[1],
                lda = in(reg) lda,
                b0 = in(reg) b[0],
                b1 = in(reg) b[1],
                ldb = in(reg) NR * 4,
                options(nostack, readonly, preserves_flags)
            )
        }
    }

    unsafe fn store(&mut self, out: *mut u8, ldo: usize) {
        // SAFETY: configured tiles; the four stores write the 32 × 128-byte block the caller
        // vouched for.
        unsafe {
            std::arch::asm!(
                "tilestored [{o00} + {ldo}*1], tmm0",
                "tilestored [{o01} + {ldo}*1], tmm1",
                "tilestored [{o10} + {ldo}*1], tmm2",
                "tilestored [{o11} + {ldo}*1], tmm3",
                o00 = in(reg) out,
                o01 = in(reg) out.add(NR * 4),
                o10 = in(reg) out.add(ROWS * ldo),
                o11 = in(reg) out.add(ROWS * ldo + NR * 4),
                ldo = in(reg) ldo,
                options(nostack, preserves_flags)
            )
        }
    }
}

/// One block of a [`product`]: up to 32 rows × two panels of sums, as the tiles stored them.
pub(super) struct Block<'a> {
    sums: &'a [f32],
    /// The first rows of the two row tiles.
    r: [usize; 2],
}

impl Block<'_> {
    /// Row `g`'s 32 sums: panel `j`'s 16 columns, then panel `j + 1`'s (when `j + 1` is in the
    /// product's panels; else nothing to read).
    pub(super) fn row(&self, g: usize) -> &[f32] {
        let local = if g < self.r[0] + ROWS {
            g - self.r[0]
        } else {
            ROWS + g - self.r[1]
        };
        &self.sums[local * 2 * NR..][..2 * NR]
    }
}

/// `Σ_p A[i, p] · B[p, col]` in f32 for the rows `rows` and the panels `panels` of `b`, over
/// `steps` steps of 32 (`b` is read as rows of pairs `16·s..16·s + 16` at step `s`), handed
/// over as `finish(j, rows, block)` for each block of up to 32 rows × panels `j` and `j + 1`
/// ([`Block::row`] gives each row's sums).
///
/// `a(r, s)` gives the `A` tiles of step `s` for the 16 rows from `r[0]` and from `r[1]`: their
/// first bytes, and the bytes from one row to the next. The tiles of a last block of fewer than
/// 32 rows start earlier, so as to end at row `valid` at most (those rows are computed again and
/// not handed over).
///
/// The accumulators are the thread's tile registers from `zero` to `store`: `a` and `finish`
/// must not run anything that could use the tiles meanwhile (no rayon call: a job stolen then
/// could take them). The software model, whose accumulators are its own, cannot catch that.
///
/// # Safety
/// `rows.end ≤ valid`, `valid ≥ 16`; for every `r` with `r[t] + 16 ≤ valid` and `s < steps`,
/// `a(r, s)` returns addresses of 16 readable rows of 64 bytes each, readable until its next
/// call.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    tiles: &mut impl Tiles,
    rows: Range<usize>,
    valid: usize,
    steps: usize,
    mut a: impl FnMut([usize; 2], usize) -> ([*const u8; 2], usize),
    b: &PackedBf16,
    panels: Range<usize>,
    mut finish: impl FnMut(usize, Range<usize>, &Block),
) {
    assert!(valid >= ROWS && rows.end <= valid, "amx::product: rows");
    assert!(panels.end <= b.panels(), "amx::product: panel out of range");
    assert!(
        b.panel(0).len() >= steps * ROWS * NR,
        "amx::product: B shorter than the steps"
    );
    let mut block = [0f32; 2 * ROWS * 2 * NR];
    let mut j = panels.start;
    while j < panels.end {
        let pair = [b.panel(j), b.panel((j + 1).min(panels.end - 1))];
        let mut i = rows.start;
        while i < rows.end {
            // The two row tiles' first rows, moved back to end at `valid` at most.
            let r = [i.min(valid - ROWS), (i + ROWS).min(valid - ROWS)];
            // SAFETY: a `Tiles` is configured by its maker; `a` vouches for its A tiles (the
            // caller's contract: both end at `valid` at most); each B tile is 16 rows of its
            // panel, which holds at least `steps` steps (asserted); `block` is 32 rows of 128
            // bytes.
            unsafe {
                tiles.zero();
                for s in 0..steps {
                    let (at, stride) = a(r, s);
                    let b_at = s * ROWS * NR;
                    let b = [pair[0][b_at..].as_ptr(), pair[1][b_at..].as_ptr()];
                    tiles.step(at, stride, b.map(|p| p.cast()));
                }
                tiles.store(block.as_mut_ptr().cast(), 2 * NR * 4);
            }
            // Rows i.. of the block: those of the first tile from i, then the second's beyond.
            let end = (i + 2 * ROWS).min(rows.end);
            finish(j, i..end, &Block { sums: &block, r });
            i = end;
        }
        j += 2;
    }
}

/// [`product`] of the `m × k` bf16 matrix `a` (row `i` at `a[i * lda..][..k2]`, `k2`: `b`'s
/// rows rounded up to even; `m` at least 16) and `b`, as there. The last, partial step reads
/// `A` from a zero-padded copy.
pub(super) fn gemm(
    tiles: &mut impl Tiles,
    m: usize,
    a: &[u16],
    lda: usize,
    b: &PackedBf16,
    panels: Range<usize>,
    finish: impl FnMut(usize, Range<usize>, &Block),
) {
    let k2 = b.k().div_ceil(2) * 2;
    assert!(m >= ROWS, "amx::gemm: fewer rows than a tile");
    assert!(
        lda >= k2 && a.len() >= (m - 1) * lda + k2,
        "amx::gemm: A too short"
    );
    let (whole, tail) = (k2 / DEPTH, k2 % DEPTH);
    let mut a_tail = [[0u16; DEPTH]; 2 * ROWS];
    let tiles_of = |r: [usize; 2], s: usize| -> ([*const u8; 2], usize) {
        if s < whole {
            let at = |t: usize| a[r[t] * lda + s * DEPTH..].as_ptr().cast::<u8>();
            ([at(0), at(1)], lda * 2)
        } else {
            for (row, dst) in a_tail.iter_mut().enumerate() {
                let src = r[row / ROWS] + row % ROWS;
                dst[..tail].copy_from_slice(&a[src * lda + whole * DEPTH..][..tail]);
            }
            let at = |t: usize| a_tail[t * ROWS..].as_ptr().cast::<u8>();
            ([at(0), at(1)], DEPTH * 2)
        }
    };
    // SAFETY: rows 0..m, all readable; a tile of rows r..r + 16 ≤ m reads, at a whole step,
    // 32 values inside each row's `k2` (asserted above), at the last partial step the copy
    // (32 rows of 64 bytes, rewritten only at the next call).
    unsafe {
        product(
            tiles,
            0..m,
            m,
            k2.div_ceil(DEPTH),
            tiles_of,
            b,
            panels,
            finish,
        )
    }
}

/// The four tile instructions in software, as Intel's SDM describes them (per output, the even
/// and the odd products of the 16 pairs each summed from zero by fused multiply-adds, rounding
/// to nearest even; the two sums added, then added to the accumulator; subnormal results
/// flushed to zero), over the same memory: the twin the tests run [`product`] on, on every CPU.
#[cfg(test)]
#[derive(Default)]
pub(super) struct Model {
    c: [[[f32; NR]; ROWS]; 4],
}

#[cfg(test)]
impl Tiles for Model {
    unsafe fn zero(&mut self) {
        self.c = Default::default();
    }

    unsafe fn step(&mut self, a: [*const u8; 2], lda: usize, b: [*const u8; 2]) {
        use super::bf16::from_bf16;
        let load = |p: *const u8, stride: usize| -> [[u16; DEPTH]; ROWS] {
            // SAFETY: the caller vouches for 16 rows of 64 bytes at each pointer.
            std::array::from_fn(|row| unsafe {
                p.add(row * stride).cast::<[u16; DEPTH]>().read_unaligned()
            })
        };
        let (a, b) = (
            [load(a[0], lda), load(a[1], lda)],
            [load(b[0], NR * 4), load(b[1], NR * 4)],
        );
        // Output subnormals flush to zero.
        let ftz = |x: f32| {
            if x.is_subnormal() {
                0.0 * x.signum()
            } else {
                x
            }
        };
        for (t, c) in self.c.iter_mut().enumerate() {
            let (a, b) = (&a[t / 2], &b[t % 2]);
            for (row, c) in c.iter_mut().enumerate() {
                for (col, c) in c.iter_mut().enumerate() {
                    let (mut even, mut odd) = (0f32, 0f32);
                    for k in 0..DEPTH / 2 {
                        let (a0, a1) = (from_bf16(a[row][2 * k]), from_bf16(a[row][2 * k + 1]));
                        let (b0, b1) = (from_bf16(b[k][2 * col]), from_bf16(b[k][2 * col + 1]));
                        even = ftz(a0.mul_add(b0, even));
                        odd = ftz(a1.mul_add(b1, odd));
                    }
                    *c = ftz(*c + ftz(even + odd));
                }
            }
        }
    }

    unsafe fn store(&mut self, out: *mut u8, ldo: usize) {
        for (t, c) in self.c.iter().enumerate() {
            for (row, values) in c.iter().enumerate() {
                let at = (t / 2 * ROWS + row) * ldo + t % 2 * NR * 4;
                // SAFETY: inside the 32 × 128-byte block the caller vouches for.
                unsafe { out.add(at).cast::<[f32; NR]>().write_unaligned(*values) };
            }
        }
    }
}
