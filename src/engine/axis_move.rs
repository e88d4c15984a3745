//! Axis moves of the optimized encoder plans on tract's thread pool.
//!
//! tract's `MoveAxis` copies element by element on one thread. What tract cannot fold away in
//! the TinyViT encoder are the six layout changes at its patch mergings and its neck (tokens
//! `[1, H·W, C]` ↔ channels `[1, C, H, W]`): 18 ms at 1 thread, and the same 18 ms at 2. Every
//! move of one axis is a transpose of two middle axes, `[outer, p, q, inner]` →
//! `[outer, q, p, inner]` (the moved axis is `p` or `q`, the axes it jumps over the other).
//! [`replace`] swaps each large one in an optimized plan for [`SamrtMoveAxis`], which copies
//! that transpose in square tiles that stay in L1, its output rows split over tract's pool.
//! `SAMRT_MOVE_AXIS=0` keeps tract's.

use super::threads::par_chunks_mut;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_hir::internal::*;

/// Smaller moves stay tract's: a task costs more than their copy.
pub const MIN_ELEMENTS: usize = 1 << 15;

/// Side of the copy tiles: 16 rows of 16 values of 4 bytes are 16 cache lines read and written.
const TILE: usize = 16;

/// Replaces every `MoveAxis` of at least [`MIN_ELEMENTS`] f32 or f16 values with known shape in
/// `model` (an optimized plan's model) by [`SamrtMoveAxis`]; returns how many.
pub fn replace(model: &mut TypedModel) -> TractResult<usize> {
    if std::env::var("SAMRT_MOVE_AXIS").is_ok_and(|v| v == "0") {
        return Ok(0);
    }
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let Some(&AxisOp::Move(from, to)) = model.node(id).op_as::<AxisOp>() else {
            continue;
        };
        let Some(&input) = model.node(id).inputs.first() else {
            continue;
        };
        let fact = model.outlet_fact(input)?;
        let large = fact
            .shape
            .as_concrete()
            .is_some_and(|s| s.iter().product::<usize>() >= MIN_ELEMENTS);
        let copyable = matches!(fact.datum_type, DatumType::F32 | DatumType::F16);
        if large && copyable && fact.konst.is_none() && from != to {
            model.node_mut(id).op = Box::new(SamrtMoveAxis { from, to });
            replaced += 1;
        }
    }
    Ok(replaced)
}

/// tract's `AxisOp::Move(from, to)` (remove axis `from`, insert it at `to`) for f32 and f16, as a
/// tiled transpose split over tract's pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SamrtMoveAxis {
    pub from: usize,
    pub to: usize,
}

impl SamrtMoveAxis {
    /// `shape` seen as `[outer, p, q, inner]`, whose `p` and `q` the move swaps.
    fn transpose_of(&self, shape: &[usize]) -> [usize; 4] {
        let prod = |r: std::ops::Range<usize>| shape[r].iter().product::<usize>();
        let rank = shape.len();
        if self.from < self.to {
            [
                prod(0..self.from),
                shape[self.from],
                prod(self.from + 1..self.to + 1),
                prod(self.to + 1..rank),
            ]
        } else {
            [
                prod(0..self.to),
                prod(self.to..self.from),
                shape[self.from],
                prod(self.from + 1..rank),
            ]
        }
    }
}

impl Op for SamrtMoveAxis {
    fn name(&self) -> StaticName {
        "SamrtMoveAxis".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("axis {} to {}", self.from, self.to)])
    }

    op_as_typed_op!();
}

impl EvalOp for SamrtMoveAxis {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(
            self.from.max(self.to) < shape.len(),
            "SamrtMoveAxis: axis {} to {} on a tensor of rank {}",
            self.from,
            self.to,
            shape.len()
        );
        let mut out_shape: TVec<usize> = shape.into();
        let moved = out_shape.remove(self.from);
        out_shape.insert(self.to, moved);
        let dims = self.transpose_of(shape);
        let out = match x.datum_type() {
            DatumType::F32 => moved_copy::<f32>(&x, &out_shape, dims)?,
            DatumType::F16 => moved_copy::<f16>(&x, &out_shape, dims)?,
            other => bail!("SamrtMoveAxis: f32 or f16 expected, got {other:?}"),
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for SamrtMoveAxis {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        AxisOp::Move(self.from, self.to).output_facts(inputs)
    }

    as_op!();
}

/// The output of the move of `x` (`[outer, p, q, inner]` as `dims`) into `out_shape`.
fn moved_copy<T: Datum + Copy>(
    x: &Tensor,
    out_shape: &[usize],
    dims: [usize; 4],
) -> TractResult<Tensor> {
    let view = x.try_as_plain_ram()?;
    let src = view.as_slice::<T>()?;
    // SAFETY: f32 and f16 have no invalid bit patterns, and every value is written below.
    let mut out = unsafe { Tensor::uninitialized::<T>(out_shape)? };
    let [_, p, _, inner] = dims;
    let row = p * inner;
    if row > 0 && !src.is_empty() {
        let mut out_view = out.try_as_plain_ram_mut()?;
        let dst = out_view.as_slice_mut::<T>()?;
        let len = dst.len();
        par_chunks_mut(dst, row, len, |first, rows| {
            transpose_rows(src, dims, first, rows);
            Ok(())
        })?;
    }
    Ok(out)
}

/// Output rows `first..` (each `p x inner` values: output row `(o, j)` holds input
/// `[o, 0..p, j, ..]`) of the transpose of `src` (`[outer, p, q, inner]` as `dims`).
fn transpose_rows<T: Copy>(src: &[T], dims: [usize; 4], first: usize, rows: &mut [T]) {
    let [_, p, q, inner] = dims;
    let row = p * inner;
    let n = rows.len() / row;
    if inner == 1 {
        // Tiles of TILE output rows x TILE values: the input's TILE strided lines serve all
        // the rows of a tile while in L1.
        for r0 in (0..n).step_by(TILE) {
            let r1 = (r0 + TILE).min(n);
            for k0 in (0..p).step_by(TILE) {
                let k1 = (k0 + TILE).min(p);
                for r in r0..r1 {
                    let (o, j) = ((first + r) / q, (first + r) % q);
                    let base = o * p * q + j;
                    let out = &mut rows[r * p + k0..r * p + k1];
                    for (k, value) in (k0..k1).zip(out.iter_mut()) {
                        *value = src[base + k * q];
                    }
                }
            }
        }
    } else {
        for (r, out) in rows.chunks_exact_mut(row).enumerate() {
            let (o, j) = ((first + r) / q, (first + r) % q);
            for (k, part) in out.chunks_exact_mut(inner).enumerate() {
                let at = ((o * p + k) * q + j) * inner;
                part.copy_from_slice(&src[at..at + inner]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::tract_linalg::multithread::{multithread_tract_scope, Executor};

    fn run(op: &dyn EvalOp, x: Tensor) -> Tensor {
        let out = op.eval(&EvalContext::out_of_plan(), tvec!(x.into_tvalue()));
        out.unwrap().remove(0).into_tensor()
    }

    #[test]
    fn moves_match_tracts() {
        let shapes: [&[usize]; 4] = [
            &[1, 67, 301],
            &[1, 33, 35, 130],
            &[2, 5, 17, 3, 4],
            &[40, 1],
        ];
        for shape in shapes {
            let len: usize = shape.iter().product();
            let values: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 7.0).collect();
            let x = Tensor::from_shape(shape, &values).unwrap();
            for from in 0..shape.len() {
                for to in 0..shape.len() {
                    if from == to {
                        continue;
                    }
                    let want = run(&AxisOp::Move(from, to), x.clone());
                    let ours = SamrtMoveAxis { from, to };
                    assert_eq!(run(&ours, x.clone()), want, "{shape:?} {from} → {to}");
                    let pooled =
                        multithread_tract_scope(Executor::multithread(2), || run(&ours, x.clone()));
                    assert_eq!(pooled, want, "{shape:?} {from} → {to}, 2 threads");
                    let half = x.cast_to::<f16>().unwrap().into_owned();
                    let want_half = run(&AxisOp::Move(from, to), half.clone());
                    assert_eq!(run(&ours, half), want_half, "{shape:?} {from} → {to}, f16");
                }
            }
        }
    }
}
