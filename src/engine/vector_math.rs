//! Element-wise math that vectorizes, shared by samrt's operators: plain `f32` arithmetic the
//! compiler turns into SIMD inside functions compiled for a target feature (see [`isa`]), with
//! no calls into libm and no float-to-int conversions that would keep a loop scalar.

/// The instruction set the kernels are compiled for, probed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    Baseline,
}

impl Isa {
    /// Whether this is the AVX-512 variant (false on every other architecture).
    pub fn is_avx512(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self == Isa::Avx512
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2Fma;
            }
        }
        Isa::Baseline
    })
}

/// Defines `fn NAME(args) -> ret` that runs `BODY::<F>(args)` compiled for the instruction set
/// [`isa`] found: AVX-512F or AVX2+FMA (`F` = [`Fused`]) on x86_64, the target's baseline
/// (`F` = [`Baseline`]) otherwise. `BODY` is a free generic function marked `#[inline(always)]`,
/// so that it is compiled inside each variant.
macro_rules! dispatch_isa {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            use $crate::engine::vector_math::{isa, Baseline, Isa};
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                $body::<$crate::engine::vector_math::Fused>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                $body::<$crate::engine::vector_math::Fused>($($arg),*)
            }
            match isa() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX-512F (probed).
                Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX2 and FMA (probed).
                Isa::Avx2Fma => unsafe { avx2($($arg),*) },
                Isa::Baseline => $body::<Baseline>($($arg),*),
            }
        }
    };
}
pub(crate) use dispatch_isa;

/// Multiply-add, fused where the instruction set has it.
pub trait MulAdd {
    /// Whether `mul_add` is one fused instruction (the kernels compiled for FMA; read where
    /// x86_64's kernels pick their intrinsics).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const FUSED: bool;
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// For kernels compiled with FMA (x86_64 with `fma`/`avx512f`, aarch64).
#[allow(dead_code)]
pub struct Fused;
impl MulAdd for Fused {
    const FUSED: bool = true;
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// The target's baseline: fused on aarch64 (always has FMA), separate elsewhere (a software
/// `fma` call would be far slower than a multiply and an add).
pub struct Baseline;
impl MulAdd for Baseline {
    const FUSED: bool = false;
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        if cfg!(any(target_arch = "aarch64", target_feature = "fma")) {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
}

/// `e^x` for `x ≤ 0` (softmax after subtracting the row's maximum), in plain arithmetic that
/// vectorizes: Cephes' `expf` polynomial on `x - n·ln 2`, times `2^n`; relative error ~2e-7.
#[inline(always)]
pub fn exp_nonpositive<F: MulAdd>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    // t's bits are ROUND's plus n: 2ⁿ's exponent comes from them with integer arithmetic, no
    // float-to-int conversion (Rust's saturating `as` would keep this loop scalar).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = F::mul_add(-n, LN2_LO, F::mul_add(-n, LN2_HI, x));
    let mut p = 1.987_569_1e-4;
    p = F::mul_add(p, r, 1.398_2e-3);
    p = F::mul_add(p, r, 8.333_452e-3);
    p = F::mul_add(p, r, 4.166_579_6e-2);
    p = F::mul_add(p, r, 0.166_666_65);
    p = F::mul_add(p, r, 0.5);
    let e = F::mul_add(p, r * r, r + 1.0);
    e * f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23)
}

/// `erf(x)` by Abramowitz and Stegun's 7.1.28, the formula of tract's own `erf`:
/// `1 - (1 + a₁|x| + … + a₆|x|⁶)^-16` with the sign of `x`. The formula's error is 3e-7; in f32
/// the 16th power amplifies rounding, to below 1.5e-6 (as tract's).
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn erf<F: MulAdd>(x: f32) -> f32 {
    let z = x.abs();
    let mut p = 0.000_043_063_8;
    p = F::mul_add(p, z, 0.000_276_567_2);
    p = F::mul_add(p, z, 0.000_152_014_3);
    p = F::mul_add(p, z, 0.009_270_527_2);
    p = F::mul_add(p, z, 0.042_282_012_3);
    p = F::mul_add(p, z, 0.070_523_078_4);
    let base = F::mul_add(p, z, 1.0);
    let b2 = base * base;
    let b4 = b2 * b2;
    let b8 = b4 * b4;
    let erf = 1.0 - 1.0 / (b8 * b8);
    if x < 0.0 {
        -erf
    } else {
        erf
    }
}

/// GELU, exact form: `x/2 · (1 + erf(x/√2))` (ONNX `Gelu`, PyTorch's `nn.GELU()`).
#[inline(always)]
pub fn gelu<F: MulAdd>(x: f32) -> f32 {
    let half = 0.5 * x;
    F::mul_add(half, erf::<F>(x * std::f32::consts::FRAC_1_SQRT_2), half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_on_softmax_inputs() {
        for i in 0..87_000 {
            let x = -(i as f32) * 1e-3;
            let (got, want) = (exp_nonpositive::<Baseline>(x), x.exp());
            assert!((got - want).abs() <= 4e-7 * want, "{x}: {got} vs {want}");
        }
        // Below e^-87 (1.6e-38) values are clamped there: nothing next to a row's maximum (1.0).
        assert_eq!(
            exp_nonpositive::<Baseline>(-200.0),
            exp_nonpositive::<Baseline>(-87.0)
        );
        assert!(exp_nonpositive::<Baseline>(-87.0) < 2e-38);
    }

    /// Against the libm-free reference `erf` of f64 arithmetic (Abramowitz-Stegun 7.1.26 is not
    /// accurate enough): a Taylor series below 3, the continued fraction of erfc above.
    fn erf_f64(x: f64) -> f64 {
        let z = x.abs();
        let r = if z < 3.0 {
            let mut term = z;
            let mut sum = z;
            let mut n = 0.0;
            loop {
                n += 1.0;
                term *= -z * z / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (z + f);
            }
            1.0 - (-z * z).exp() / (std::f64::consts::PI.sqrt() * (z + f))
        };
        r.copysign(x)
    }

    fn erf_and_gelu_match_f64_with<F: MulAdd>() {
        for i in -12_000..=12_000 {
            let x = i as f32 * 1e-3;
            let want = erf_f64(x as f64);
            let got = erf::<F>(x) as f64;
            assert!((got - want).abs() < 1.5e-6, "erf({x}): {got} vs {want}");
            let want = 0.5 * x as f64 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
            let got = gelu::<F>(x) as f64;
            let bound = 1.5e-6 * (1.0 + x.abs() as f64);
            assert!((got - want).abs() < bound, "gelu({x}): {got} vs {want}");
        }
        assert_eq!(gelu::<F>(0.0), 0.0);
        assert_eq!(gelu::<F>(-30.0), 0.0);
        assert_eq!(gelu::<F>(30.0), 30.0);
    }

    #[test]
    fn erf_and_gelu_match_f64() {
        erf_and_gelu_match_f64_with::<Baseline>();
        erf_and_gelu_match_f64_with::<Fused>();
    }
}

/// A zero-initialized buffer whose first element sits on a cache-line (64-byte) boundary, for
/// data the kernels load 64 bytes at a time: a load that straddles two lines costs Intel cores
/// a second load (a `Vec` of a few hundred KB comes from `mmap` 16 bytes past a page start).
#[derive(Clone)]
pub struct AlignedVec<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> AlignedVec<T> {
    pub const ALIGN: usize = 64;

    pub fn zeroed(len: usize) -> Self {
        let spare = Self::ALIGN / std::mem::size_of::<T>().max(1);
        let buf = vec![T::default(); len + spare];
        let start = buf.as_ptr().align_offset(Self::ALIGN);
        assert!(
            start <= spare,
            "AlignedVec: element size does not divide the alignment"
        );
        AlignedVec { buf, start, len }
    }
}

impl<T> std::ops::Deref for AlignedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl<T> std::ops::DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl<T: PartialEq> PartialEq for AlignedVec<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for AlignedVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedVec[{}]", self.len)
    }
}

/// Asks the CPU to bring the cache line holding `ptr` into L1 ahead of its use (a hint: never
/// faults, a no-op where there is no such instruction).
#[inline(always)]
pub fn prefetch<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching has no architectural effect and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}
