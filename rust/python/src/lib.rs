//! `lowrank_rs._core`: the binding layer over `lowrank-core`.
//!
//! Arrays in, arrays out, the GIL released around every piece of real work, and each core error variant mapped onto
//! one class of the Python hierarchy in `lowrank_rs.errors`. Argument normalisation (dtype dispatch, reshaping,
//! contiguity) happens in the Python layer; nothing here decides anything.
//!
//! Every call into the core goes through [`detached`]: without the GIL, with Python's signals checked while it
//! runs (so Ctrl-C stops a long decomposition), and with any panic turned into `InternalError` instead of taking
//! the interpreter down.

use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;

use faer::{Mat, MatRef};
use lowrank_core::allocate::{self, MaxRank};
use lowrank_core::covariance::{self, Batch, Center, Elements, Entry};
use lowrank_core::package::{self, DType, TensorView};
use lowrank_core::rsvd::{self, SvdOptions};
use lowrank_core::{threads, Error};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

mod exceptions {
    pyo3::import_exception!(lowrank_rs.errors, LowRankError);
    pyo3::import_exception!(lowrank_rs.errors, ShapeError);
    pyo3::import_exception!(lowrank_rs.errors, DtypeError);
    pyo3::import_exception!(lowrank_rs.errors, NonFiniteError);
    pyo3::import_exception!(lowrank_rs.errors, EmptyInputError);
    pyo3::import_exception!(lowrank_rs.errors, RankError);
    pyo3::import_exception!(lowrank_rs.errors, InfeasibleError);
    pyo3::import_exception!(lowrank_rs.errors, AdapterFormatError);
    pyo3::import_exception!(lowrank_rs.errors, AdapterIOError);
    pyo3::import_exception!(lowrank_rs.errors, InvalidArgumentError);
    pyo3::import_exception!(lowrank_rs.errors, OutOfMemoryError);
    pyo3::import_exception!(lowrank_rs.errors, InternalError);
}

/// The one place core errors become Python exceptions (a local newtype because of the orphan rule).
struct PyLowRankError(Error);

impl From<Error> for PyLowRankError {
    fn from(e: Error) -> Self {
        PyLowRankError(e)
    }
}

impl From<PyLowRankError> for PyErr {
    fn from(PyLowRankError(e): PyLowRankError) -> PyErr {
        use exceptions::*;
        let msg = e.to_string();
        match e {
            Error::Shape(_) => ShapeError::new_err(msg),
            Error::Dtype(_) => DtypeError::new_err(msg),
            Error::NonFinite(_) => NonFiniteError::new_err(msg),
            Error::Empty(_) => EmptyInputError::new_err(msg),
            Error::Rank(_) => RankError::new_err(msg),
            Error::Infeasible(_) => InfeasibleError::new_err(msg),
            Error::Value(_) => InvalidArgumentError::new_err(msg),
            Error::OutOfMemory(_) => OutOfMemoryError::new_err(msg),
            // Only reached when the signal that stopped the work is gone by now; see `detached`.
            Error::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err(msg),
            Error::Format { .. } => AdapterFormatError::new_err(msg),
            Error::Io { .. } => AdapterIOError::new_err(msg),
        }
    }
}

/// Runs core work `f` with the GIL released. `f` receives the interrupt check to hand to the core: it briefly
/// takes the GIL to run Python's signal handlers (the core calls it on this thread, at most every 100 ms), and
/// the exception a handler raises (KeyboardInterrupt) is the one this returns. A panic becomes `InternalError`.
fn detached<R: Send>(py: Python<'_>, f: impl FnOnce(&dyn Fn() -> bool) -> Result<R, Error> + Send) -> PyResult<R> {
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let outcome = py.detach(|| {
        let interrupt = || match Python::attach(|py| py.check_signals()) {
            Ok(()) => false,
            Err(e) => {
                *raised.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                true
            }
        };
        panic::catch_unwind(AssertUnwindSafe(|| f(&interrupt)))
    });
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(Error::Interrupted)) => match raised.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Err(PyLowRankError(Error::Interrupted).into()),
        },
        Ok(Err(e)) => Err(PyLowRankError(e).into()),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Err(exceptions::InternalError::new_err(format!(
                "internal error in lowrank-core (please report it): {what}"
            )))
        }
    }
}

fn shape_error(msg: String) -> PyErr {
    exceptions::ShapeError::new_err(msg)
}

fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| shape_error(format!("{what} must be a C-contiguous array")))
}

#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    Ok(threads::set_num_threads(n).map_err(PyLowRankError)?)
}

#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

/// Streaming covariance; see `lowrank_rs.linalg.CovarianceAccumulator` for the documented API.
///
/// Frozen with an inner mutex so that a background thread can run `update` without the GIL while the main thread
/// reads `count`: a pyo3 mutable borrow would instead fail with "already borrowed".
#[pyclass(frozen, module = "lowrank_rs._core")]
struct CovarianceAccumulator {
    inner: Mutex<covariance::CovarianceAccumulator>,
}

impl CovarianceAccumulator {
    fn lock(&self) -> std::sync::MutexGuard<'_, covariance::CovarianceAccumulator> {
        // The core never panics while holding the lock, so a poisoned state is still a consistent one.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl CovarianceAccumulator {
    #[new]
    fn new(dim: usize, center: &str) -> PyResult<Self> {
        let center: Center = center.parse().map_err(PyLowRankError)?;
        let inner = covariance::CovarianceAccumulator::new(dim, center).map_err(PyLowRankError)?;
        Ok(Self { inner: Mutex::new(inner) })
    }

    #[getter]
    fn dim(&self) -> usize {
        self.lock().dim()
    }

    #[getter]
    fn center(&self) -> &'static str {
        self.lock().center().as_str()
    }

    #[getter]
    fn count(&self) -> u64 {
        self.lock().count()
    }

    /// `x`: `[batch, seq, dim]`, float32 / float64, or uint16 bit patterns with `bits16` = "f16" | "bf16".
    #[pyo3(signature = (x, bits16=None, mask=None))]
    fn update(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        bits16: Option<&str>,
        mask: Option<PyReadonlyArray1<'_, bool>>,
    ) -> PyResult<()> {
        let mask_slice = match &mask {
            Some(m) => Some(contiguous(m, "mask")?),
            None => None,
        };
        macro_rules! feed {
            ($t:ty, $variant:path) => {{
                let arr: PyReadonlyArray3<'_, $t> = x.extract()?;
                let shape = arr.shape().to_vec();
                let data = contiguous(&arr, "activations")?;
                let batch = Batch {
                    data: $variant(data),
                    sequences: shape[0],
                    seq_len: shape[1],
                    dim: shape[2],
                    mask: mask_slice,
                };
                detached(py, |interrupt| self.lock().update_interruptible(&batch, interrupt))
            }};
        }
        match bits16 {
            None => {
                if x.extract::<PyReadonlyArray3<'_, f32>>().is_ok() {
                    feed!(f32, Elements::F32)
                } else {
                    feed!(f64, Elements::F64)
                }
            }
            Some("f16") => feed!(u16, Elements::F16),
            Some("bf16") => feed!(u16, Elements::Bf16),
            Some(other) => Err(exceptions::DtypeError::new_err(format!(
                "unknown 16-bit format {other:?}: expected \"f16\" or \"bf16\""
            ))),
        }
    }

    fn merge(&self, py: Python<'_>, other: &Bound<'_, CovarianceAccumulator>) -> PyResult<()> {
        let other = other.get();
        if std::ptr::eq(self, other) {
            // Locking the same mutex twice would deadlock; merging with oneself doubles every sum.
            let snapshot = self.lock().clone();
            return detached(py, |_| self.lock().merge(&snapshot));
        }
        let theirs = other.lock().clone();
        detached(py, |_| self.lock().merge(&theirs))
    }

    fn mean<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let mean = detached(py, |_| self.lock().mean())?;
        Ok(mean.into_pyarray(py))
    }

    #[pyo3(signature = (dtype = "float64"))]
    fn covariance<'py>(&self, py: Python<'py>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
        fn read<'py, T: Entry + numpy::Element>(
            py: Python<'py>,
            acc: &CovarianceAccumulator,
        ) -> PyResult<Bound<'py, PyAny>> {
            let (dim, cov) = detached(py, |_| {
                let acc = acc.lock();
                Ok((acc.dim(), acc.covariance_as::<T>()?))
            })?;
            Ok(cov.into_pyarray(py).reshape([dim, dim])?.into_any())
        }
        match dtype {
            "float64" => read::<f64>(py, self),
            "float32" => read::<f32>(py, self),
            other => Err(exceptions::DtypeError::new_err(format!(
                "covariance dtype must be \"float64\" or \"float32\", not {other:?}"
            ))),
        }
    }
}

fn mat_ref<'a, T>(slice: &'a [T], shape: &[usize]) -> MatRef<'a, T> {
    MatRef::from_row_major_slice(slice, shape[0], shape[1])
}

fn mat_to_numpy<'py, T: numpy::Element + Copy>(py: Python<'py>, m: &Mat<T>) -> PyResult<Bound<'py, PyArray2<T>>> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut v = Vec::new();
    v.try_reserve_exact(r * c)
        .map_err(|_| exceptions::OutOfMemoryError::new_err(format!("cannot allocate a {r}×{c} result array")))?;
    for i in 0..r {
        for j in 0..c {
            v.push(m[(i, j)]);
        }
    }
    v.into_pyarray(py).reshape([r, c])
}

type BasisPair<'py, T> = (Bound<'py, PyArray2<T>>, Bound<'py, PyArray1<T>>);
type SvdTriple<'py, T> = (Bound<'py, PyArray2<T>>, Bound<'py, PyArray1<T>>, Bound<'py, PyArray2<T>>);

fn svd_impl<'py, T: numpy::Element + rsvd::Real>(
    py: Python<'py>,
    a: PyReadonlyArray2<'py, T>,
    opts: SvdOptions,
) -> PyResult<SvdTriple<'py, T>> {
    let shape = a.shape().to_vec();
    let data = contiguous(&a, "matrix")?;
    let svd =
        detached(py, |interrupt| rsvd::randomized_svd_dense_interruptible(mat_ref(data, &shape), &opts, interrupt))?;
    Ok((mat_to_numpy(py, &svd.u)?, svd.s.into_pyarray(py), mat_to_numpy(py, &svd.vt)?))
}

/// `a`: float32 or float64 `[m, n]`, C-contiguous. Returns `(u, s, vt)` in the input's dtype.
#[pyfunction]
#[pyo3(signature = (a, rank, oversample, power_iters, seed))]
fn randomized_svd<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    rank: usize,
    oversample: usize,
    power_iters: usize,
    seed: u64,
) -> PyResult<Bound<'py, pyo3::types::PyTuple>> {
    let opts = SvdOptions { rank, oversample, power_iters, seed };
    if let Ok(a32) = a.extract::<PyReadonlyArray2<'py, f32>>() {
        svd_impl(py, a32, opts)?.into_pyobject(py)
    } else {
        svd_impl(py, a.extract::<PyReadonlyArray2<'py, f64>>()?, opts)?.into_pyobject(py)
    }
}

fn basis_impl<'py, T: numpy::Element + rsvd::Real>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, T>,
    c: PyReadonlyArray2<'py, T>,
    opts: SvdOptions,
) -> PyResult<BasisPair<'py, T>> {
    let (ws, cs) = (w.shape().to_vec(), c.shape().to_vec());
    let (wd, cd) = (contiguous(&w, "weight")?, contiguous(&c, "covariance")?);
    let (vt, s) = detached(py, |interrupt| {
        rsvd::task_aware_basis_interruptible(mat_ref(wd, &ws), mat_ref(cd, &cs), &opts, interrupt)
    })?;
    Ok((mat_to_numpy(py, &vt)?, s.into_pyarray(py)))
}

/// `weight` and `covariance`: both float32 or both float64, C-contiguous. Returns `(vt, s)` in that dtype.
#[pyfunction]
#[pyo3(signature = (weight, covariance, rank, oversample, power_iters, seed))]
fn task_aware_basis<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    covariance: &Bound<'py, PyAny>,
    rank: usize,
    oversample: usize,
    power_iters: usize,
    seed: u64,
) -> PyResult<Bound<'py, pyo3::types::PyTuple>> {
    let opts = SvdOptions { rank, oversample, power_iters, seed };
    if let Ok(w32) = weight.extract::<PyReadonlyArray2<'py, f32>>() {
        basis_impl(py, w32, covariance.extract()?, opts)?.into_pyobject(py)
    } else {
        basis_impl(py, weight.extract::<PyReadonlyArray2<'py, f64>>()?, covariance.extract()?, opts)?.into_pyobject(py)
    }
}

#[pyfunction]
#[pyo3(signature = (scores, budget, min_rank, max_rank, per_module_max, multiple_of))]
fn allocate_ranks(
    scores: Vec<f64>,
    budget: usize,
    min_rank: usize,
    max_rank: Option<usize>,
    per_module_max: Option<Vec<usize>>,
    multiple_of: usize,
) -> PyResult<Vec<usize>> {
    let max = match (&per_module_max, max_rank) {
        (Some(list), _) => MaxRank::PerModule(list),
        (None, Some(m)) => MaxRank::Uniform(m),
        (None, None) => MaxRank::Unbounded,
    };
    Ok(allocate::allocate_ranks(&scores, budget, min_rank, max, multiple_of).map_err(PyLowRankError)?)
}

#[pyfunction]
fn allocate_alphas(scores: Vec<f64>, alpha: f64) -> PyResult<Vec<f64>> {
    Ok(allocate::allocate_alphas(&scores, alpha).map_err(PyLowRankError)?)
}

/// `tensors`: `(name, dtype, shape, bytes)` with `bytes` a C-contiguous uint8 view of the data.
#[pyfunction]
fn write_adapter(
    py: Python<'_>,
    dir: PathBuf,
    tensors: Vec<(String, String, Vec<usize>, PyReadonlyArray1<'_, u8>)>,
    config_json: &str,
) -> PyResult<()> {
    let mut dtypes = Vec::with_capacity(tensors.len());
    for (name, dtype, _, _) in &tensors {
        let dt: DType =
            dtype.parse().map_err(|e: Error| PyLowRankError(Error::Dtype(format!("tensor {name:?}: {e}"))))?;
        dtypes.push(dt);
    }
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, _, shape, bytes), dtype) in tensors.iter().zip(dtypes) {
        views.push(TensorView { name, dtype, shape, data: contiguous(bytes, "tensor bytes")? });
    }
    detached(py, |_| package::write_adapter(&dir, &views, config_json))
}

type RawTensor<'py> = (String, &'static str, Vec<usize>, Bound<'py, PyBytes>);

/// Returns `([(name, dtype, shape, bytes)], config_json)`.
#[pyfunction]
fn read_adapter<'py>(py: Python<'py>, dir: PathBuf) -> PyResult<(Vec<RawTensor<'py>>, String)> {
    let adapter = detached(py, |_| package::read_adapter(&dir))?;
    let mut tensors = Vec::with_capacity(adapter.tensors.len());
    for (name, t) in adapter.tensors {
        // `PyBytes::new` panics when Python cannot allocate; `new_with` reports it.
        let bytes = PyBytes::new_with(py, t.data.len(), |buf| {
            buf.copy_from_slice(&t.data);
            Ok(())
        })
        .map_err(|_| {
            exceptions::OutOfMemoryError::new_err(format!("cannot allocate {} bytes for tensor {name:?}", t.data.len()))
        })?;
        tensors.push((name, t.dtype.name(), t.shape, bytes));
    }
    Ok((tensors, adapter.config_json))
}

/// Panics inside [`detached`], for the test that a core panic reaches Python as `InternalError`: no input is known
/// to make the core panic, which is the point, so the test needs a deliberate one.
#[pyfunction]
fn _panic_for_testing(py: Python<'_>, message: String) -> PyResult<()> {
    detached(py, |_| -> Result<(), Error> { panic!("{message}") })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<CovarianceAccumulator>()?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(randomized_svd, m)?)?;
    m.add_function(wrap_pyfunction!(task_aware_basis, m)?)?;
    m.add_function(wrap_pyfunction!(allocate_ranks, m)?)?;
    m.add_function(wrap_pyfunction!(allocate_alphas, m)?)?;
    m.add_function(wrap_pyfunction!(write_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(read_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_testing, m)?)?;
    Ok(())
}
