//! Buffers that start on a cache line.
//!
//! The kernels read packed weights (and the AMX conv its input map) in rows of 64 bytes: one
//! AVX-512 vector, one tile row. malloc aligns to 16 bytes only, so in a plain `Vec` nearly every
//! such row straddles two cache lines, and each load touches both. [`Aligned`] starts at a
//! 64-byte boundary, so rows of 64 bytes from its start each sit in one line.

use std::marker::PhantomData;

/// Element types a buffer may hold: plain numbers, for which every bit pattern (zero first) is
/// a valid value.
///
/// # Safety
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid `Self`, and its alignment at
/// most 64.
pub unsafe trait Plain: Copy {}
// SAFETY: integers and floats: any bits are a value; alignments 2 and 4.
unsafe impl Plain for u16 {}
// SAFETY: as above.
unsafe impl Plain for u32 {}
// SAFETY: as above.
unsafe impl Plain for f32 {}

/// One cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// `len` values of `T`, zeroed at first, the first at a 64-byte boundary. Derefs to `[T]`.
#[derive(Clone)]
pub struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    values: PhantomData<T>,
}

impl<T: Plain> Aligned<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        Self {
            lines: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            values: PhantomData,
        }
    }
}

impl<T: Plain> std::ops::Deref for Aligned<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len · size_of::<T>()` initialised bytes, aligned to
        // 64 (≥ T's alignment), and any bytes are a valid `T` (`Plain`).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

impl<T: Plain> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned({} values)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_line_holds_len_zeros_and_keeps_writes() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut a = Aligned::<u16>::zeroed(len);
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert!(a.iter().all(|&x| x == 0));
            if let Some(last) = a.last_mut() {
                *last = 7;
            }
            let b = a.clone();
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert_eq!(b.last().copied(), (len > 0).then_some(7));
        }
        let f = Aligned::<f32>::zeroed(33);
        assert_eq!((f.len(), f.as_ptr() as usize % 64), (33, 0));
    }
}
