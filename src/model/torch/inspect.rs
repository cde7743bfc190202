//! TorchScript files are checked before anything of them runs.
//!
//! A TorchScript archive carries code: `forward`, submodules' methods,
//! scripted classes, hooks, and `__setstate__`, which libtorch's own loader
//! runs while loading. That code can call operators such as
//! `aten::from_file` (read or, shared, write any file). So before the
//! archive goes near `torch::jit::load`, `inspect.cpp` compiles every class
//! and function the archive names, the way libtorch's loader does but
//! without running `__setstate__`, and lists every operator of every
//! compiled function (inlined). The file is refused unless every operator
//! is in [`ALLOWED`]: tensor computation, shape and container handling,
//! control flow. Nothing that touches files, storage from files, the
//! network, threads, the process or uninitialised memory is in it
//! (`aten::from_file`, `aten::save`, `prim::Print`, `prim::fork`,
//! `aten::wait`, `prim::rpc_*`, `aten::set_`, `aten::as_strided`,
//! `aten::empty`, custom-op namespaces, C++ custom classes, ...). The
//! names are operator names: every overload of an allowed name passes.
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
    "aten::__and__",
    "aten::__contains__",
    "aten::__derive_index",
    "aten::__getitem__",
    "aten::__interpolate",
    "aten::__is__",
    "aten::__isnot__",
    "aten::__not__",
    "aten::__or__",
    "aten::__range_length",
    "aten::__upsample",
    "aten::__xor__",
    "aten::_convolution",
    "aten::_native_multi_head_attention",
    "aten::_nested_tensor_from_mask",
    "aten::_nested_tensor_from_mask_left_aligned",
    "aten::_set_item",
    "aten::_transformer_encoder_layer_fwd",
    "aten::_upsample_bicubic2d_aa",
    "aten::_upsample_bilinear2d_aa",
    "aten::_upsample_lanczos2d_aa",
    "aten::_upsample_nearest_exact1d",
    "aten::_upsample_nearest_exact2d",
    "aten::_upsample_nearest_exact3d",
    "aten::abs",
    "aten::adaptive_avg_pool1d",
    "aten::adaptive_avg_pool2d",
    "aten::adaptive_avg_pool3d",
    "aten::adaptive_max_pool1d",
    "aten::adaptive_max_pool2d",
    "aten::adaptive_max_pool3d",
    "aten::add",
    "aten::add_",
    "aten::addcdiv",
    "aten::addcmul",
    "aten::addmm",
    "aten::all",
    "aten::alpha_dropout",
    "aten::amax",
    "aten::amin",
    "aten::any",
    "aten::append",
    "aten::arange",
    "aten::argmax",
    "aten::argmin",
    "aten::argsort",
    "aten::atan",
    "aten::atan2",
    "aten::avg_pool1d",
    "aten::avg_pool2d",
    "aten::avg_pool3d",
    "aten::baddbmm",
    "aten::batch_norm",
    "aten::bilinear",
    "aten::bmm",
    "aten::broadcast_to",
    "aten::cat",
    "aten::cdist",
    "aten::ceil",
    "aten::celu",
    "aten::chunk",
    "aten::clamp",
    "aten::clamp_",
    "aten::clamp_max",
    "aten::clamp_min",
    "aten::clamp_min_",
    "aten::clip",
    "aten::clone",
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
    "aten::cosine_similarity",
    "aten::cumsum",
    "aten::detach",
    "aten::dim",
    "aten::div",
    "aten::div_",
    "aten::dropout",
    "aten::dropout_",
    "aten::einsum",
    "aten::elu",
    "aten::elu_",
    "aten::embedding",
    "aten::embedding_bag",
    "aten::eq",
    "aten::erf",
    "aten::exp",
    "aten::expand",
    "aten::expand_as",
    "aten::expm1",
    "aten::extend",
    "aten::feature_dropout",
    "aten::fill_",
    "aten::flatten",
    "aten::flip",
    "aten::floor",
    "aten::floordiv",
    "aten::fmod",
    "aten::format",
    "aten::full",
    "aten::full_like",
    "aten::gather",
    "aten::ge",
    "aten::gelu",
    "aten::gelu_",
    "aten::glu",
    "aten::group_norm",
    "aten::gru",
    "aten::gru_cell",
    "aten::gt",
    "aten::hardsigmoid",
    "aten::hardsigmoid_",
    "aten::hardswish",
    "aten::hardswish_",
    "aten::hardtanh",
    "aten::hardtanh_",
    "aten::index",
    "aten::index_put_",
    "aten::index_select",
    "aten::insert",
    "aten::instance_norm",
    "aten::is_autocast_enabled",
    "aten::is_floating_point",
    "aten::is_grad_enabled",
    "aten::isfinite",
    "aten::isinf",
    "aten::isnan",
    "aten::item",
    "aten::items",
    "aten::keys",
    "aten::layer_norm",
    "aten::le",
    "aten::leaky_relu",
    "aten::leaky_relu_",
    "aten::len",
    "aten::lerp",
    "aten::linalg_vector_norm",
    "aten::linear",
    "aten::list",
    "aten::log",
    "aten::log10",
    "aten::log1p",
    "aten::log2",
    "aten::log_sigmoid",
    "aten::log_softmax",
    "aten::logical_and",
    "aten::logical_not",
    "aten::logical_or",
    "aten::logsumexp",
    "aten::lstm",
    "aten::lstm_cell",
    "aten::lt",
    "aten::masked_fill",
    "aten::masked_fill_",
    "aten::matmul",
    "aten::max",
    "aten::max_pool1d",
    "aten::max_pool2d",
    "aten::max_pool3d",
    "aten::maximum",
    "aten::mean",
    "aten::meshgrid",
    "aten::min",
    "aten::minimum",
    "aten::mish",
    "aten::mish_",
    "aten::mm",
    "aten::movedim",
    "aten::mul",
    "aten::mul_",
    "aten::mv",
    "aten::nan_to_num",
    "aten::narrow",
    "aten::ne",
    "aten::neg",
    "aten::norm",
    "aten::numel",
    "aten::one_hot",
    "aten::ones",
    "aten::ones_like",
    "aten::outer",
    "aten::pad",
    "aten::pairwise_distance",
    "aten::permute",
    "aten::pixel_shuffle",
    "aten::pop",
    "aten::pow",
    "aten::prelu",
    "aten::prod",
    "aten::reciprocal",
    "aten::relu",
    "aten::relu6",
    "aten::relu_",
    "aten::remainder",
    "aten::repeat",
    "aten::repeat_interleave",
    "aten::reshape",
    "aten::reshape_as",
    "aten::reverse",
    "aten::rnn_relu",
    "aten::rnn_relu_cell",
    "aten::rnn_tanh",
    "aten::rnn_tanh_cell",
    "aten::roll",
    "aten::round",
    "aten::rsqrt",
    "aten::rsub",
    "aten::scalar_tensor",
    "aten::scaled_dot_product_attention",
    "aten::select",
    "aten::selu",
    "aten::selu_",
    "aten::sigmoid",
    "aten::sigmoid_",
    "aten::sign",
    "aten::silu",
    "aten::silu_",
    "aten::sin",
    "aten::size",
    "aten::slice",
    "aten::softmax",
    "aten::softplus",
    "aten::sort",
    "aten::split",
    "aten::split_with_sizes",
    "aten::sqrt",
    "aten::squeeze",
    "aten::stack",
    "aten::std",
    "aten::std_mean",
    "aten::str",
    "aten::sub",
    "aten::sub_",
    "aten::sum",
    "aten::t",
    "aten::tan",
    "aten::tanh",
    "aten::tanh_",
    "aten::tensor",
    "aten::threshold",
    "aten::threshold_",
    "aten::to",
    "aten::to_padded_tensor",
    "aten::topk",
    "aten::transpose",
    "aten::tril",
    "aten::triu",
    "aten::trunc",
    "aten::type_as",
    "aten::unbind",
    "aten::unflatten",
    "aten::unsafe_chunk",
    "aten::unsafe_split",
    "aten::unsqueeze",
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
    "aten::view",
    "aten::view_as",
    "aten::warn",
    "aten::where",
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
}

/// What the archive's compiled code uses.
#[derive(Debug, Default)]
pub struct Inspection {
    /// `(function, operator)` pairs, sorted.
    pub ops: Vec<(String, String)>,
    /// Reasons to refuse regardless of operators (C++ custom classes, ...).
    pub problems: Vec<String>,
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
