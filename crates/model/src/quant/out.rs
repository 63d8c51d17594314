//! The parallel output: runs of columns on the step workers, each
//! written straight into the row-major result through its own view.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Runs `columns(j0, view)` over runs of output columns on the step
/// workers (as many as rayon's pool has threads) and returns the row-major
/// `[m, n]` result, which the kernels write directly through their run's
/// [`OutColumns`] view. Every run but the last
/// starts and ends on a [`TILE`] boundary. Writing in place matters: a
/// column-major buffer per run transposed afterwards costs 10% of a SmolLM2
/// prefill and 7% of a Gemma-3 one.
#[allow(unsafe_code)] // the views of different tasks are disjoint
pub(super) fn par_columns(n: usize, m: usize, columns: impl Fn(usize, OutColumns<'_>) + Sync) -> Vec<f32> {
    let per_task =
        n.div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD).max(MIN_COLS_PER_TASK).next_multiple_of(TILE);
    let mut out = vec![0f32; n * m];
    let shared = SharedOut(out.as_mut_ptr());
    workers::for_each(n.div_ceil(per_task), &|task| {
        let j0 = task * per_task;
        let view = OutColumns { out: shared, n, m, j0, cols: per_task.min(n - j0), _owns: std::marker::PhantomData };
        columns(j0, view);
    });
    out
}

/// Columns `j0..j0 + cols` of every row of a row-major `[m, n]` output:
/// one task's run in [`par_columns`], or part of one. Views of
/// different tasks never overlap, and a narrower view borrows its parent.
pub(super) struct OutColumns<'a> {
    pub(super) out: SharedOut,
    pub(super) n: usize,
    pub(super) m: usize,
    pub(super) j0: usize,
    pub(super) cols: usize,
    pub(super) _owns: std::marker::PhantomData<&'a mut [f32]>,
}

impl OutColumns<'_> {
    /// Columns in the view.
    pub(super) fn cols(&self) -> usize {
        self.cols
    }

    /// Writes row `row`, column `col` (of the view).
    ///
    /// # Panics
    /// Outside the view.
    #[inline]
    #[allow(unsafe_code)]
    pub(super) fn put(&mut self, row: usize, col: usize, v: f32) {
        assert!(row < self.m && col < self.cols, "outside the output view");
        // SAFETY: in bounds of the `[m, n]` output (row < m, j0 + col <
        // n), which outlives the region; only this view writes these
        // columns while it lives (see `par_columns`).
        unsafe { *self.out.at(row * self.n + self.j0 + col) = v };
    }

    /// Row `row`'s columns of the view, contiguous.
    ///
    /// # Panics
    /// Outside the view.
    #[inline]
    #[allow(unsafe_code)]
    pub(super) fn row(&mut self, row: usize) -> &mut [f32] {
        assert!(row < self.m, "outside the output view");
        // SAFETY: as in `put`: `cols` elements from `(row, j0)` are in
        // bounds and only this view (borrowed mutably for the slice's life)
        // writes them.
        unsafe { std::slice::from_raw_parts_mut(self.out.at(row * self.n + self.j0), self.cols) }
    }

    /// The view's columns `c0..c0 + cols`.
    pub(super) fn narrow(&mut self, c0: usize, cols: usize) -> OutColumns<'_> {
        assert!(c0 + cols <= self.cols, "outside the output view");
        OutColumns { out: self.out, n: self.n, m: self.m, j0: self.j0 + c0, cols, _owns: std::marker::PhantomData }
    }
}

/// The output of [`par_columns`], written by its tasks' views in disjoint
/// column ranges.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements through it (see `par_columns`).
#[allow(unsafe_code)]
unsafe impl Send for SharedOut {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element `at`; the caller keeps `at` in bounds.
    pub(super) fn at(self, at: usize) -> *mut f32 {
        self.0.wrapping_add(at)
    }
}
