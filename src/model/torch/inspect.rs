//! TorchScript files are checked before anything of them runs.
//!
//! A TorchScript archive carries code: `forward`, submodules' methods,
//! scripted classes, hooks, and `__setstate__`, which libtorch's own loader
//! runs while loading. That code can call operators such as
//! `aten::from_file` (read or, shared, write any file). So before the
//! archive goes near `torch::jit::load`, `inspect.cpp` compiles every class
//! and function the archive names, the way libtorch's loader does but
//! without running `__setstate__`, and lists every operator of every
//! compiled function (each callee is one of them, so nothing is inlined:
//! inlining can grow exponentially). Code nested deeper than 200 brackets
//! or 800 columns, more than 64 MiB of code or 5 M graph nodes, a function
//! that expands to more than 200,000 nodes once its calls are inlined (as
//! libtorch compiles it to run; a scripted transformer encoder is about
//! 5,000), and an
//! `unchecked_cast` that does not narrow a type (object type confusion) are
//! refused (also a "narrowing" of `Any`, a union or an interface to a class
//! or tuple type: only `Optional[T]` to `T` is a safe guess at an object's
//! layout), as is a statement longer than 16,384 characters or more than
//! 1,000 `elif` branches in one file (both compile recursively). The file is refused unless every operator
//! is in [`ALLOWED`]: tensor computation, shape and container handling,
//! control flow. Nothing that touches files, storage from files, the
//! network, threads, the process or uninitialised memory is in it
//! (`aten::from_file`, `aten::save`, `prim::Print`, `prim::fork`,
//! `aten::wait`, `prim::rpc_*`, `aten::set_`, `aten::as_strided`,
//! `aten::empty`, custom-op namespaces, C++ custom classes, ...). The
//! names are operator names: every overload of an allowed name passes.
//! Kernels known to read or write out of bounds on hostile arguments
//! (`aten::embedding_bag` with negative offsets, `aten::grid_sampler*`,
//! `aten::_pad_packed_sequence`) are left out too.
//!
//! Even so, libtorch trusts what its operators are given (an integer
//! `INT64_MIN // -1` faults the CPU); so models run in a process of their
//! own ([`super::host`]), where a crash ends one call, not the worker.
//!
//! What the allowlist cannot stop is a model that computes for too long
//! (an endless `while`) or allocates too much: the load and inference
//! deadlines bound the first (see the registry), container memory limits
//! the second.

use std::ffi::{c_char, c_int, CStr};

/// Operators a TorchScript model may use (node kinds after inlining).
pub const ALLOWED: &[&str] = &[
    "aten::Bool",
    "aten::Float",
    "aten::FloatImplicit",
    "aten::Int",
    "aten::IntImplicit",
    "aten::ScalarImplicit",
    "aten::T",
    "aten::__and__",
    "aten::__contains__",
    "aten::__derive_index",
    "aten::__getitem__",
    "aten::__iand__",
    "aten::__ilshift__",
    "aten::__interpolate",
    "aten::__ior__",
    "aten::__irshift__",
    "aten::__is__",
    "aten::__isnot__",
    "aten::__ixor__",
    "aten::__lshift__",
    "aten::__not__",
    "aten::__or__",
    "aten::__range_length",
    "aten::__round_to_zero_floordiv",
    "aten::__rshift__",
    "aten::__upsample",
    "aten::__xor__",
    "aten::_convolution",
    "aten::_native_multi_head_attention",
    "aten::_nested_tensor_from_mask",
    "aten::_nested_tensor_from_mask_left_aligned",
    "aten::_pack_padded_sequence",
    "aten::_set_item",
    "aten::_transformer_encoder_layer_fwd",
    "aten::_upsample_bicubic2d_aa",
    "aten::_upsample_bilinear2d_aa",
    "aten::_upsample_lanczos2d_aa",
    "aten::_upsample_nearest_exact1d",
    "aten::_upsample_nearest_exact2d",
    "aten::_upsample_nearest_exact3d",
    "aten::abs",
    "aten::abs_",
    "aten::acos",
    "aten::acosh",
    "aten::adaptive_avg_pool1d",
    "aten::adaptive_avg_pool2d",
    "aten::adaptive_avg_pool3d",
    "aten::adaptive_max_pool1d",
    "aten::adaptive_max_pool2d",
    "aten::adaptive_max_pool3d",
    "aten::add",
    "aten::add_",
    "aten::addbmm",
    "aten::addcdiv",
    "aten::addcmul",
    "aten::addcmul_",
    "aten::addmm",
    "aten::addmv",
    "aten::adjoint",
    "aten::affine_grid_generator",
    "aten::all",
    "aten::allclose",
    "aten::alpha_dropout",
    "aten::amax",
    "aten::amin",
    "aten::aminmax",
    "aten::any",
    "aten::append",
    "aten::arange",
    "aten::argmax",
    "aten::argmin",
    "aten::argsort",
    "aten::argwhere",
    "aten::asin",
    "aten::asinh",
    "aten::atan",
    "aten::atan2",
    "aten::atanh",
    "aten::avg_pool1d",
    "aten::avg_pool2d",
    "aten::avg_pool3d",
    "aten::baddbmm",
    "aten::batch_norm",
    "aten::bilinear",
    "aten::bitwise_and",
    "aten::bitwise_not",
    "aten::bitwise_or",
    "aten::bitwise_xor",
    "aten::bmm",
    "aten::bool",
    "aten::broadcast_to",
    "aten::bucketize",
    "aten::cat",
    "aten::cdist",
    "aten::ceil",
    "aten::ceil_",
    "aten::celu",
    "aten::celu_",
    "aten::channel_shuffle",
    "aten::chunk",
    "aten::clamp",
    "aten::clamp_",
    "aten::clamp_max",
    "aten::clamp_max_",
    "aten::clamp_min",
    "aten::clamp_min_",
    "aten::clip",
    "aten::clone",
    "aten::col2im",
    "aten::column_stack",
    "aten::concat",
    "aten::constant_pad_nd",
    "aten::contiguous",
    "aten::conv1d",
    "aten::conv2d",
    "aten::conv3d",
    "aten::conv_transpose1d",
    "aten::conv_transpose2d",
    "aten::conv_transpose3d",
    "aten::convolution",
    "aten::copy",
    "aten::copy_",
    "aten::cos",
    "aten::cosh",
    "aten::cosine_similarity",
    "aten::count_nonzero",
    "aten::cross",
    "aten::cummax",
    "aten::cummin",
    "aten::cumprod",
    "aten::cumsum",
    "aten::detach",
    "aten::diag",
    "aten::diag_embed",
    "aten::diagonal",
    "aten::diff",
    "aten::digamma",
    "aten::dim",
    "aten::dist",
    "aten::div",
    "aten::div_",
    "aten::dot",
    "aten::double",
    "aten::dropout",
    "aten::dropout_",
    "aten::dstack",
    "aten::einsum",
    "aten::element_size",
    "aten::elu",
    "aten::elu_",
    "aten::embedding",
    "aten::eq",
    "aten::eq_",
    "aten::equal",
    "aten::erf",
    "aten::erfc",
    "aten::erfinv",
    "aten::exp",
    "aten::exp2",
    "aten::exp_",
    "aten::expand",
    "aten::expand_as",
    "aten::expm1",
    "aten::extend",
    "aten::eye",
    "aten::feature_dropout",
    "aten::fill_",
    "aten::fill_diagonal_",
    "aten::flatten",
    "aten::flip",
    "aten::fliplr",
    "aten::flipud",
    "aten::float",
    "aten::floor",
    "aten::floor_",
    "aten::floor_divide",
    "aten::floordiv",
    "aten::fmax",
    "aten::fmin",
    "aten::fmod",
    "aten::fold",
    "aten::format",
    "aten::frac",
    "aten::fractional_max_pool2d",
    "aten::frobenius_norm",
    "aten::full",
    "aten::full_like",
    "aten::gather",
    "aten::ge",
    "aten::ge_",
    "aten::gelu",
    "aten::gelu_",
    "aten::glu",
    "aten::group_norm",
    "aten::gru",
    "aten::gru_cell",
    "aten::gt",
    "aten::gt_",
    "aten::half",
    "aten::hardshrink",
    "aten::hardsigmoid",
    "aten::hardsigmoid_",
    "aten::hardswish",
    "aten::hardswish_",
    "aten::hardtanh",
    "aten::hardtanh_",
    "aten::heaviside",
    "aten::hsplit",
    "aten::hstack",
    "aten::hypot",
    "aten::im2col",
    "aten::index",
    "aten::index_add",
    "aten::index_copy",
    "aten::index_fill",
    "aten::index_put_",
    "aten::index_select",
    "aten::inner",
    "aten::insert",
    "aten::instance_norm",
    "aten::int",
    "aten::is_autocast_enabled",
    "aten::is_contiguous",
    "aten::is_floating_point",
    "aten::is_grad_enabled",
    "aten::isclose",
    "aten::isfinite",
    "aten::isinf",
    "aten::isnan",
    "aten::item",
    "aten::items",
    "aten::keys",
    "aten::kron",
    "aten::kthvalue",
    "aten::layer_norm",
    "aten::le",
    "aten::le_",
    "aten::leaky_relu",
    "aten::leaky_relu_",
    "aten::len",
    "aten::lerp",
    "aten::lerp_",
    "aten::lgamma",
    "aten::linalg_norm",
    "aten::linalg_vector_norm",
    "aten::linear",
    "aten::linspace",
    "aten::list",
    "aten::local_response_norm",
    "aten::log",
    "aten::log10",
    "aten::log1p",
    "aten::log2",
    "aten::log_",
    "aten::log_sigmoid",
    "aten::log_sigmoid_forward",
    "aten::log_softmax",
    "aten::logaddexp",
    "aten::logaddexp2",
    "aten::logical_and",
    "aten::logical_not",
    "aten::logical_or",
    "aten::logical_xor",
    "aten::logit",
    "aten::logspace",
    "aten::logsumexp",
    "aten::long",
    "aten::lp_pool1d",
    "aten::lp_pool2d",
    "aten::lstm",
    "aten::lstm_cell",
    "aten::lt",
    "aten::lt_",
    "aten::mT",
    "aten::masked_fill",
    "aten::masked_fill_",
    "aten::masked_scatter",
    "aten::masked_select",
    "aten::matmul",
    "aten::max",
    "aten::max_pool1d",
    "aten::max_pool1d_with_indices",
    "aten::max_pool2d",
    "aten::max_pool2d_with_indices",
    "aten::max_pool3d",
    "aten::max_unpool2d",
    "aten::maximum",
    "aten::mean",
    "aten::median",
    "aten::meshgrid",
    "aten::min",
    "aten::minimum",
    "aten::mish",
    "aten::mish_",
    "aten::mm",
    "aten::mode",
    "aten::moveaxis",
    "aten::movedim",
    "aten::msort",
    "aten::mul",
    "aten::mul_",
    "aten::mv",
    "aten::nan_to_num",
    "aten::nanmean",
    "aten::nanquantile",
    "aten::nansum",
    "aten::narrow",
    "aten::ne",
    "aten::ne_",
    "aten::neg",
    "aten::neg_",
    "aten::new_full",
    "aten::new_ones",
    "aten::new_zeros",
    "aten::nonzero",
    "aten::norm",
    "aten::normalize",
    "aten::numel",
    "aten::numpy_T",
    "aten::one_hot",
    "aten::ones",
    "aten::ones_like",
    "aten::outer",
    "aten::pad",
    "aten::pairwise_distance",
    "aten::permute",
    "aten::pixel_shuffle",
    "aten::pixel_unshuffle",
    "aten::pop",
    "aten::pow",
    "aten::pow_",
    "aten::prelu",
    "aten::prod",
    "aten::quantile",
    "aten::reciprocal",
    "aten::relu",
    "aten::relu6",
    "aten::relu_",
    "aten::remainder",
    "aten::remainder_",
    "aten::renorm",
    "aten::repeat",
    "aten::repeat_interleave",
    "aten::reshape",
    "aten::reshape_as",
    "aten::reverse",
    "aten::rms_norm",
    "aten::rnn_relu",
    "aten::rnn_relu_cell",
    "aten::rnn_tanh",
    "aten::rnn_tanh_cell",
    "aten::roll",
    "aten::rot90",
    "aten::round",
    "aten::round_",
    "aten::row_stack",
    "aten::rrelu",
    "aten::rsqrt",
    "aten::rsub",
    "aten::scalar_tensor",
    "aten::scaled_dot_product_attention",
    "aten::scatter",
    "aten::scatter_add",
    "aten::searchsorted",
    "aten::select",
    "aten::selu",
    "aten::selu_",
    "aten::sgn",
    "aten::sigmoid",
    "aten::sigmoid_",
    "aten::sign",
    "aten::silu",
    "aten::silu_",
    "aten::sin",
    "aten::sinh",
    "aten::size",
    "aten::slice",
    "aten::softmax",
    "aten::softplus",
    "aten::softshrink",
    "aten::softsign",
    "aten::sort",
    "aten::split",
    "aten::split_with_sizes",
    "aten::sqrt",
    "aten::sqrt_",
    "aten::square",
    "aten::squeeze",
    "aten::squeeze_",
    "aten::stack",
    "aten::std",
    "aten::std_mean",
    "aten::str",
    "aten::stride",
    "aten::sub",
    "aten::sub_",
    "aten::sum",
    "aten::swapaxes",
    "aten::swapdims",
    "aten::t",
    "aten::t_",
    "aten::take_along_dim",
    "aten::tan",
    "aten::tanh",
    "aten::tanh_",
    "aten::tanhshrink",
    "aten::tensor",
    "aten::tensor_split",
    "aten::tensordot",
    "aten::threshold",
    "aten::threshold_",
    "aten::tile",
    "aten::to",
    "aten::to_dense",
    "aten::to_padded_tensor",
    "aten::topk",
    "aten::trace",
    "aten::transpose",
    "aten::tril",
    "aten::tril_indices",
    "aten::triu",
    "aten::triu_indices",
    "aten::true_divide",
    "aten::trunc",
    "aten::trunc_",
    "aten::type",
    "aten::type_as",
    "aten::unbind",
    "aten::unflatten",
    "aten::unfold",
    "aten::unique_consecutive",
    "aten::unsafe_chunk",
    "aten::unsafe_split",
    "aten::unsqueeze",
    "aten::unsqueeze_",
    "aten::upsample_bicubic2d",
    "aten::upsample_bilinear2d",
    "aten::upsample_linear1d",
    "aten::upsample_nearest1d",
    "aten::upsample_nearest2d",
    "aten::upsample_nearest3d",
    "aten::upsample_trilinear3d",
    "aten::values",
    "aten::var",
    "aten::var_mean",
    "aten::vdot",
    "aten::view",
    "aten::view_as",
    "aten::view_as_real",
    "aten::vsplit",
    "aten::vstack",
    "aten::warn",
    "aten::where",
    "aten::where_",
    "aten::xlogy",
    "aten::zero_",
    "aten::zeros",
    "aten::zeros_like",
    "prim::CallFunction",
    "prim::CallMethod",
    "prim::Constant",
    "prim::CreateObject",
    "prim::DictConstruct",
    "prim::EnumName",
    "prim::EnumValue",
    "prim::GetAttr",
    "prim::If",
    "prim::ListConstruct",
    "prim::ListUnpack",
    "prim::Loop",
    "prim::NumToTensor",
    "prim::RaiseException",
    "prim::SetAttr",
    "prim::TupleConstruct",
    "prim::TupleIndex",
    "prim::TupleUnpack",
    "prim::Uninitialized",
    "prim::abs",
    "prim::device",
    "prim::dtype",
    "prim::is_cuda",
    "prim::is_nested",
    "prim::is_quantized",
    "prim::isinstance",
    "prim::layout",
    "prim::max",
    "prim::min",
    "prim::requires_grad",
    "prim::tolist",
    "prim::type",
    "prim::unchecked_cast",
    "prim::unchecked_unwrap_optional",
];

extern "C" {
    fn mlw_torchscript_inspect(data: *const c_char, len: usize, out: *mut *mut c_char) -> c_int;
    fn mlw_torchscript_free(p: *mut c_char);
    fn mlw_torch_route_warnings(sink: extern "C" fn(*const c_char, usize));
}

/// libtorch's warnings (`TORCH_WARN`, a model's `warnings.warn`) go to the
/// log (escaped like every log line), at most 10 and then one in 10,000,
/// instead of raw to stderr where a model file could forge log lines.
pub fn route_warnings() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a process-wide handler that calls `warning`
        unsafe { mlw_torch_route_warnings(warning) }
    });
}

extern "C" fn warning(msg: *const c_char, len: usize) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let n = SEEN.fetch_add(1, Ordering::Relaxed);
    if n >= 10 && !n.is_multiple_of(10_000) {
        return;
    }
    // SAFETY: libtorch passes its message's bytes for the call's duration
    let bytes = unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) };
    let text: String = String::from_utf8_lossy(bytes).chars().take(2000).collect();
    if WARN_TO_STDERR.load(Ordering::Relaxed) {
        // a torch host: one escaped line, which the worker logs
        eprintln!("libtorch warning: {}", crate::text::escape(&text));
    } else {
        tracing::warn!(warnings_so_far = n + 1, "libtorch warning: {text}");
    }
}

/// Warnings go to stderr (a torch host's, which its worker reads) rather
/// than to this process's log.
pub(crate) static WARN_TO_STDERR: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// What the archive's compiled code uses.
#[derive(Debug, Default)]
pub struct Inspection {
    /// `(function, operator)` pairs, sorted.
    pub ops: Vec<(String, String)>,
    /// Reasons to refuse regardless of operators (C++ custom classes, ...).
    pub problems: Vec<String>,
    /// `(function, graph nodes once its calls are inlined)`.
    pub inlined_nodes: Vec<(String, u64)>,
}

/// Compiles the archive without running it and lists its operators.
pub fn inspect(bytes: &[u8]) -> Result<Inspection, String> {
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: `bytes` outlives the call; the shim writes a malloc'd,
    // NUL-terminated string (or null) to `out`, freed below with its free.
    let rc = unsafe { mlw_torchscript_inspect(bytes.as_ptr().cast(), bytes.len(), &mut out) };
    let text = if out.is_null() {
        String::from("out of memory while inspecting the TorchScript archive")
    } else {
        // SAFETY: non-null and NUL-terminated (see above)
        let s = unsafe { CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        unsafe { mlw_torchscript_free(out) };
        s
    };
    if rc != 0 || out.is_null() {
        return Err(first_line(&text));
    }
    let mut found = Inspection::default();
    for line in text.lines() {
        if let Some(op) = line.strip_prefix("O ") {
            if let Some((f, k)) = op.split_once('\t') {
                found.ops.push((f.to_string(), k.to_string()));
            }
        } else if let Some(p) = line.strip_prefix("P ") {
            found.problems.push(p.to_string());
        } else if let Some(z) = line.strip_prefix("S ") {
            if let Some((f, n)) = z.split_once('\t') {
                found
                    .inlined_nodes
                    .push((f.to_string(), n.parse().unwrap_or(u64::MAX)));
            }
        }
    }
    Ok(found)
}

/// Refuses the archive unless its code uses allowed operators only, naming
/// every operator that is not (and a function that uses it).
pub fn check(bytes: &[u8]) -> Result<Inspection, String> {
    let found = inspect(bytes)?;
    // each refused operator once, with the first function that uses it
    let mut refused: std::collections::BTreeMap<&str, &str> = Default::default();
    for (function, op) in &found.ops {
        if !ALLOWED.contains(&op.as_str()) {
            refused.entry(op).or_insert(function);
        }
    }
    if found.problems.is_empty() && refused.is_empty() {
        return Ok(found);
    }
    let mut why = Vec::new();
    if !refused.is_empty() {
        let list: Vec<String> = refused
            .iter()
            .map(|(op, f)| format!("{op} (in {f})"))
            .collect();
        why.push(format!(
            "it uses operator(s) outside the allowlist of tensor computation: {}",
            list.join(", ")
        ));
    }
    why.extend(found.problems.iter().cloned());
    Err(format!(
        "refused before anything of it ran: {}; only tensor computation may run (README: TorchScript)",
        why.join("; ")
    ))
}

/// libtorch's message without its C++ context lines, at most 400 characters.
fn first_line(s: &str) -> String {
    let line = s
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error");
    line.chars().take(400).collect()
}
