"""A bank of dense experts stored as stacked weights."""

import keras
import numpy as np
from keras import ops

from moe_keras import _config
from moe_keras import _validation
from moe_keras import dispatch as dispatch_lib
from moe_keras import kernels

# `ExpertList` lives in its own module; other modules and users import it
# from here, as they did before it moved.
from moe_keras._expert_list import ExpertList as ExpertList
from moe_keras._quantized_experts import QuantizedExpertsMixin
from moe_keras._quantized_experts import _Float8Kernel
from moe_keras._quantized_experts import _IntKernel
from moe_keras._quantized_experts import _matmul
from moe_keras._quantized_experts import _stack_features
from moe_keras._quantized_experts import _take


def _per_expert_initializer(initializer, num_experts):
    """Makes a fan-based initializer see one expert's `(in, out)` fans.

    Keras' variance-scaling initializers treat the leading axes of a
    `(experts, in, out)` kernel as a receptive field, which would shrink
    every expert's weights by `sqrt(num_experts)`. Scaling the variance back
    by `num_experts` gives each expert the init a `Dense` layer would get,
    while one draw over the whole tensor keeps the experts distinct even
    with a seeded initializer.
    """
    if isinstance(initializer, keras.initializers.VarianceScaling):
        return keras.initializers.VarianceScaling(
            scale=initializer.scale * num_experts,
            mode=initializer.mode,
            distribution=initializer.distribution,
            seed=initializer.seed,
        )
    return initializer


# Up to this many experts, grouped calls on a CPU run one matmul per
# expert.
_UNROLL_EXPERTS = 8


def _on_cpu():
    """Whether the backend computes on the host CPU (no GPU or TPU).

    Read at trace time, where it decides the form of the expert matmuls.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    if backend == "torch":
        import torch

        return not torch.cuda.is_available()
    return True


def _swiglu_grad(h, upstream, weights=None):
    """Gradient of `silu(gate) * up` for the fused `h = [gate, up]`.

    The sigmoid is recomputed here rather than kept from the forward pass:
    on CPU a saved activation costs more (its memory is fresh every step)
    than the arithmetic. Both halves come out of one select over a
    `[..., 2, hidden]` view; XLA on CPU would write each half out and then
    copy both into a concatenation.
    """
    hidden = h.shape[-1] // 2
    # The leading axes stay as they are: merged, a layout that splits
    # them over two mesh axes (experts, groups) could not follow.
    lead = tuple(ops.shape(h)[:-1])
    halves = ops.reshape(h, lead + (2, hidden))
    gate, up = halves[..., :1, :], halves[..., 1:, :]
    sig = _sigmoid_again(gate)
    d = ops.expand_dims(upstream, -2) * sig
    if weights is not None:
        d = d * weights[..., None, None]
    is_gate = ops.arange(2)[:, None] == 0
    grads = ops.where(is_gate, d * up * (1.0 + gate * (1.0 - sig)), d * gate)
    return ops.reshape(grads, ops.shape(h))


def _sigmoid_again(x):
    # The same sigmoid spelled differently, so XLA's common-subexpression
    # pass cannot merge the backward's recomputation with the forward's
    # value and keep that alive instead.
    return 0.5 + 0.5 * ops.tanh(0.5 * x)


def _clamped_swiglu(h, alpha, limit):
    """GPT-OSS's GLU of a fused `[gate, up]` projection: the gate clipped
    above at `limit`, the up half into `[-limit, limit]`, then
    `gate * sigmoid(alpha * gate) * (up + 1)`."""
    gate, up = ops.split(h, 2, axis=-1)
    gate = ops.minimum(gate, limit)
    up = ops.clip(up, -limit, limit)
    return gate * ops.sigmoid(alpha * gate) * (up + 1.0)


GLU_FORMS = (False, True, "clamped_swiglu")


def check_gated(gated, activation):
    """`gated` validated against `activation` (already `get`-ed)."""
    if isinstance(gated, bool) or gated == "clamped_swiglu":
        pass
    elif isinstance(gated, (int, np.integer)) and gated in (0, 1):
        gated = bool(gated)
    else:
        raise ValueError(
            "`gated` must be False, True or 'clamped_swiglu'; received "
            f"gated={gated!r}."
        )
    if gated == "clamped_swiglu" and activation is not keras.activations.linear:
        raise ValueError(
            "`gated='clamped_swiglu'` computes its own activation "
            "(`gate * sigmoid(glu_alpha * gate)`); leave `activation` unset. "
            f"Received activation={keras.activations.serialize(activation)!r}."
        )
    return gated


def _silu_times(h, sigmoid=ops.sigmoid):
    gate, up = ops.split(h, 2, axis=-1)
    return gate * sigmoid(gate) * up


@ops.custom_gradient
def _swiglu(h):
    """`silu(gate) * up` of a fused `[..., 2 * hidden]` projection, saving
    only `h` for the backward pass."""

    def backward(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        return _swiglu_grad(h, upstream)

    return _silu_times(h), backward


@ops.custom_gradient
def _swiglu_scaled(h, weights):
    """`_swiglu(h) * weights[..., None]`: one pass forward, and the weights'
    gradient a row-wise dot with the recomputed activation."""

    def backward(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        activation = _silu_times(h, _sigmoid_again)
        # Summed in float32 under mixed precision: this is the router's
        # gradient.
        product = ops.cast(upstream * activation, "float32")
        d_weights = ops.cast(ops.sum(product, axis=-1), weights.dtype)
        return _swiglu_grad(h, upstream, weights), d_weights

    return _silu_times(h) * weights[..., None], backward


@ops.custom_gradient
def _scale_rows(h, weights):
    """`h * weights[..., None]`, its weights gradient a row-wise dot."""

    def backward(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        d_weights = dispatch_lib.row_dot(upstream, h)[..., 0]
        return upstream * weights[..., None], d_weights

    return h * weights[..., None], backward


@keras.saving.register_keras_serializable(package="moe_keras")
class DenseExperts(QuantizedExpertsMixin, keras.layers.Layer):
    """A bank of `num_experts` dense experts held as stacked weights.

    Every expert is the same small network with its own weights: a single
    projection `activation(x @ W_e + b_e)` (like `Dense(units)`), or with
    `hidden_units` a two-layer MLP `activation(x @ W1_e + b1_e) @ W2_e + b2_e`.
    `gated=True` makes the first projection a GLU,
    `activation(x @ Wg_e) * (x @ Wu_e)` (SwiGLU with `activation="silu"`);
    its gate and up projections share one fused kernel so each is one matmul.
    `gated="clamped_swiglu"` is GPT-OSS's GLU: with `g = min(x @ Wg_e,
    limit)` and `u = clip(x @ Wu_e, -limit, limit)`, it computes
    `g * sigmoid(alpha * g) * (u + 1)`. `use_output_scale=True` multiplies each
    expert's output by a learned scalar of its own (Gemma 4).
    Weights are stacked along a leading experts axis, so all experts run as
    one batched matmul rather than a Python loop over layers.

    `layer.quantize(mode)` (and `model.quantize(mode)`, which reaches
    every `DenseExperts`) quantizes the expert bank as Keras quantizes a
    `Dense` layer. `"int8"`: each kernel becomes int8 with float scales per
    expert and output channel (abs-max over the input axis); each row of
    the inputs is quantized too and the matmul runs on integers. `"int4"`:
    the same per-channel scheme in `[-8, 7]`, two values packed to a byte,
    the inputs left float. `"float8"`: float8 training (delayed scaling of
    inputs, kernels and output gradients). Biases and `output_scale` stay
    float. Every dispatch form runs on the quantized kernels; the grouped
    matmul of sorted rows (`group_sizes`) casts the integers to the compute
    dtype inside the call, and float8 runs grouped experts batched.
    Integer kernels are not trained; the inputs still get gradients.

    Args:
        num_experts: int, number of experts E.
        units: int, output features of every expert.
        hidden_units: int or None. With an int, each expert is a two-layer
            MLP with this hidden size. Defaults to `None` (one projection).
        activation: activation of the hidden layer (or of the output when
            `hidden_units` is None). Defaults to `None` (linear).
        gated: `False`, `True` or `"clamped_swiglu"`: whether the first
            projection is a GLU, and which. `True`: `activation(gate) * up`.
            `"clamped_swiglu"`: GPT-OSS's clamped SwiGLU (above), which
            takes no `activation`. The kernel holds the gate half's columns
            first, then the up half's. Defaults to `False`.
        glu_alpha: float > 0, the `alpha` of `"clamped_swiglu"`. Defaults
            to `1.702`.
        glu_limit: float > 0, the `limit` of `"clamped_swiglu"`. Defaults
            to `7.0`.
        use_bias: bool, whether the experts have biases. Defaults to `True`.
        use_output_scale: bool, whether each expert's output is multiplied
            by a learned scalar of its own (the weight `output_scale`,
            `[E]`, initialised to ones), after the output bias. Defaults to
            `False`.
        quantization_config: optional `keras.quantizers.QuantizationConfig`
            of a quantized layer; `quantize` sets it. Defaults to `None`.
        kernel_initializer: initializer of the kernels `[E, in, out]`.
            Defaults to `"glorot_uniform"`. A variance-scaling initializer
            is scaled so that each expert gets the init a `Dense` layer of
            its size would, not one shrunk by the experts axis.
        bias_initializer: initializer of the biases `[E, out]`. Defaults to
            `"zeros"`.
        kernel_regularizer: regularizer applied to the kernels. Defaults to
            `None`.
        bias_regularizer: regularizer applied to the biases. Defaults to
            `None`.
        kernel_constraint: constraint applied to the kernels. Defaults to
            `None`.
        bias_constraint: constraint applied to the biases. Defaults to
            `None`.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: float tensor, see the input shapes below.
        grouped: bool. `False` (default): every expert on every position.
            `True`: one group of tokens per expert (the `MoE` layer's
            dispatch buffers).
        group_weights: optional weights of the rows, `(num_experts, tokens)`
            (`(rows,)` with `group_sizes`); each row's output is scaled by
            its weight. With `hidden_units` the scaling is applied to the
            hidden activations, before the down projection (the same
            function, and cheaper: the MoE layer passes its gate weights
            here so that its combine needs none).
        group_experts: optional `(groups,)` int expert index of each group,
            for groups that are blocks of one expert's tokens rather than
            one group per expert (dropless dispatch in blocks).
        group_sizes: optional `(num_experts,)` int32. The inputs are then
            `(rows, features)` sorted by expert, `group_sizes[e]` rows of
            expert `e` in turn (rows past their sum are in no group), run
            as one grouped matmul per projection (dropless dispatch on a
            grouped matmul).
        implementation: with `group_sizes`, the grouped matmul to run, a
            name from `moe_keras.kernels.IMPLEMENTATIONS` other than
            `"auto"` and `"blocks"`. Defaults to `"reference"`.
        batched: optional bool, one batched matmul over the experts axis
            (`True`) or one matmul per expert (`False`). Defaults to
            per-expert matmuls on a CPU with up to 8 experts, which ran
            faster there, and the batched form otherwise; expert
            parallelism needs the batched form, since a per-expert slice of
            a sharded kernel would move that expert's weights.
        training: bool or None, whether the call is for training.

    Input shape:
        `(..., features)` when called directly; every expert is applied to
        every position. With `grouped=True`: `(num_experts, tokens,
        features)`, one group of tokens per expert; `(groups, tokens,
        features)` with `group_experts`; `(rows, features)` with
        `group_sizes`.

    Output shape:
        `(..., num_experts, units)`. With `grouped=True`: `(num_experts,
        tokens, units)`, `(groups, tokens, units)` with `group_experts`, or
        `(rows, units)` with `group_sizes`.

    Example:

    >>> experts = DenseExperts(num_experts=4, units=2, hidden_units=4)
    >>> tuple(experts(np.zeros((5, 3), "float32")).shape)
    (5, 4, 2)
    >>> buffers = np.zeros((4, 6, 3), "float32")  # 6 tokens for each expert
    >>> tuple(experts(buffers, grouped=True).shape)
    (4, 6, 2)
    >>> tuple(experts.kernel_in.shape), tuple(experts.kernel_out.shape)
    ((4, 3, 4), (4, 4, 2))
    >>> experts.quantize("int8")
    >>> experts.quantization_mode, experts.kernel_in.dtype
    ('int8', 'int8')
    >>> tuple(experts.in_kernel_scale.shape)  # per expert, per output
    (4, 4)
    """

    def __init__(
        self,
        num_experts,
        units,
        hidden_units=None,
        activation=None,
        gated=False,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        glu_alpha=1.702,
        glu_limit=7.0,
        use_output_scale=False,
        quantization_config=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = _validation.positive_int(num_experts, "num_experts")
        self.units = _validation.positive_int(units, "units")
        self.hidden_units = _validation.positive_int(
            hidden_units, "hidden_units", allow_none=True
        )
        self.activation = keras.activations.get(activation)
        self.gated = check_gated(gated, self.activation)
        self.glu_alpha = _validation.positive_float(glu_alpha, "glu_alpha")
        self.glu_limit = _validation.positive_float(glu_limit, "glu_limit")
        self.use_bias = bool(use_bias)
        self.use_output_scale = bool(use_output_scale)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        if isinstance(quantization_config, dict):
            quantization_config = keras.saving.deserialize_keras_object(
                quantization_config
            )
        self.quantization_config = quantization_config
        self.inputs_quantizer = None

    def weight_names(self):
        """The names of the weights `build` makes, `[E, ...]` each."""
        prefixes = ("",) if self.hidden_units is None else ("in_", "out_")
        kinds = ("kernel", "bias") if self.use_bias else ("kernel",)
        names = [f"{p}{kind}" for p in prefixes for kind in kinds]
        return names + (["output_scale"] if self.use_output_scale else [])

    def _projections(self):
        """`(kernel attribute, bias attribute, weight-name prefix)` of each
        projection, first to last."""
        if self.hidden_units is None:
            return (("kernel", "bias", ""),)
        return (
            ("kernel_in", "bias_in", "in_"),
            ("kernel_out", "bias_out", "out_"),
        )

    def _kernel_shapes(self, features):
        """`(fan_in, fan_out)` of each projection's kernel (per expert)."""
        first_units = self.hidden_units or self.units
        # A GLU's gate and up halves live side by side in one kernel.
        width = 2 * first_units if self.gated else first_units
        if self.hidden_units is None:
            return ((features, width),)
        return ((features, width), (self.hidden_units, self.units))

    def _projection(self, name, fan_in, fan_out, kernel=True):
        if kernel:
            kernel = self.add_weight(
                name=f"{name}kernel",
                shape=(self.num_experts, fan_in, fan_out),
                initializer=_per_expert_initializer(
                    self.kernel_initializer, self.num_experts
                ),
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,
            )
        else:
            kernel = None  # An integer kernel, from `quantized_build`.
        bias = None
        if self.use_bias:
            bias = self.add_weight(
                name=f"{name}bias",
                shape=(self.num_experts, fan_out),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        return kernel, bias

    def build(self, input_shape):
        features = _validation.feature_dim(input_shape, self.name)
        self.input_spec = _validation.features_spec(features)
        mode = self.quantization_mode
        # Quantized to integers (a layer revived from a saved quantized
        # one), the kernels are made by `quantized_build`, not here.
        float_kernels = mode not in ("int8", "int4")
        shapes = self._kernel_shapes(features)
        self.kernel_out = self.bias_out = None
        for (kernel, bias, prefix), (fan_in, fan_out) in zip(
            self._projections(), shapes
        ):
            k, b = self._projection(prefix, fan_in, fan_out, float_kernels)
            setattr(self, kernel, k)
            setattr(self, bias, b)
        self.output_scale = None
        if self.use_output_scale:
            self.output_scale = self.add_weight(
                name="output_scale",
                shape=(self.num_experts,),
                initializer="ones",
            )
        if mode is not None:
            self.quantized_build(input_shape, mode, self.quantization_config)

    # --- the forward pass ------------------------------------------------

    def _first_projection(self):
        if self.hidden_units is None:
            return self.kernel, self.bias
        return self.kernel_in, self.bias_in

    def _activate(self, h, row_weights=None, custom_gradient=True):
        """The activation, then each row scaled by `row_weights`."""
        swiglu = (
            self.gated is True and self.activation is keras.activations.silu
        )
        if swiglu and custom_gradient:
            if row_weights is None:
                return _swiglu(h)
            return _swiglu_scaled(h, row_weights)
        if self.gated == "clamped_swiglu":
            h = _clamped_swiglu(h, self.glu_alpha, self.glu_limit)
        elif swiglu:
            h = _silu_times(h)
        elif self.gated:
            gate, up = ops.split(h, 2, axis=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        if row_weights is None:
            return h
        if custom_gradient:
            return _scale_rows(h, row_weights)
        return h * row_weights[..., None]

    def call(
        self,
        inputs,
        grouped=False,
        group_experts=None,
        group_weights=None,
        batched=None,
        group_sizes=None,
        implementation=None,
        training=None,
    ):
        custom = dispatch_lib.custom_gradients(training)
        kernel, kernel_out = self._kernels(training, custom)
        if grouped and group_sizes is not None:
            return self._sorted_rows(
                inputs,
                group_sizes,
                group_weights,
                implementation,
                custom,
                kernel,
                kernel_out,
            )
        if grouped:
            if batched is None:
                # A few large matmuls, one per expert, measured faster than
                # one batched matmul on CPU (XLA runs them as independent,
                # multithreaded ops); past 8 experts the batched form wins.
                # A GPU or TPU runs the batched form as one kernel, where
                # the loop adds a slice copy per expert (a GPU profile of
                # the loop showed them), so there it is always batched.
                batched = self.num_experts > _UNROLL_EXPERTS or not _on_cpu()
            if isinstance(kernel, _Float8Kernel):
                # Float8's scales are updated by one matmul per projection.
                batched = True
            return self._grouped(
                inputs,
                group_experts,
                group_weights,
                custom,
                batched,
                kernel,
                kernel_out,
            )
        # Every expert on every position. Flattened to plain matmuls: an
        # einsum with an ellipsis here makes TensorFlow broadcast to
        # [tokens, experts, features, hidden] before contracting.
        shape = ops.shape(inputs)
        x = ops.reshape(inputs, (-1, shape[-1]))  # [tokens, features]
        bias = self._first_projection()[1]
        width = self._kernel_shapes(None)[0][1]
        # [features, experts * width]: all first projections in one matmul.
        if isinstance(kernel, (_IntKernel, _Float8Kernel)):
            stacked = kernel.stacked()
        else:
            stacked = _stack_features(kernel)
        h = _matmul(x, stacked, custom)
        h = ops.reshape(h, (-1, self.num_experts, width))
        if bias is not None:
            h = h + bias  # [tokens, experts, width]
        h = self._activate(h, custom_gradient=custom)
        if self.hidden_units is not None:
            h = self._every_expert_out(h, kernel_out, custom)
            if self.bias_out is not None:
                h = h + self.bias_out
        if self.output_scale is not None:
            h = h * ops.cast(self.output_scale, h.dtype)[:, None]
        return ops.reshape(
            h, tuple(shape[:-1]) + (self.num_experts, self.units)
        )

    def _every_expert_out(self, h, kernel_out, custom):
        """The down projection of every expert, `[T, E, h] -> [T, E, u]`."""
        if isinstance(kernel_out, _IntKernel):
            # As a batched matmul over the experts: `[E, T, h] @ [E, h, u]`.
            h = kernel_out.matmul(ops.transpose(h, (1, 0, 2)), custom)
            return ops.transpose(h, (1, 0, 2))
        if isinstance(kernel_out, _Float8Kernel):
            return kernel_out.project(
                h, lambda a, w: ops.einsum("teh,ehu->teu", a, w)
            )
        return ops.einsum("teh,ehu->teu", h, kernel_out)

    def _grouped(
        self,
        inputs,
        group_experts,
        group_weights,
        custom,
        batched,
        kernel,
        kernel_out,
    ):
        bias = self._first_projection()[1]
        bias_out = self.bias_out
        scale = self.output_scale
        if group_weights is not None:
            group_weights = ops.cast(group_weights, self.compute_dtype)
        if group_experts is not None:
            # Each group runs the expert it belongs to.
            kernel, kernel_out = (
                _take(kernel, group_experts, custom),
                _take(kernel_out, group_experts, custom),
            )
            bias, bias_out = (
                _take(bias, group_experts, custom),
                _take(bias_out, group_experts, custom),
            )
            scale = _take(scale, group_experts, custom)
        elif not batched:
            return ops.stack(
                [
                    self._mlp(
                        inputs[e],
                        kernel[e],
                        None if bias is None else bias[e],
                        None if kernel_out is None else kernel_out[e],
                        None if bias_out is None else bias_out[e],
                        None if group_weights is None else group_weights[e],
                        custom,
                        out_scale=None if scale is None else scale[e],
                    )
                    for e in range(self.num_experts)
                ]
            )
        return self._mlp(
            inputs,
            kernel,
            None if bias is None else bias[:, None, :],
            kernel_out,
            None if bias_out is None else bias_out[:, None, :],
            group_weights,
            custom,
            out_scale=None if scale is None else scale[:, None, None],
        )

    def _sorted_rows(
        self,
        rows,
        sizes,
        row_weights,
        implementation,
        custom,
        kernel,
        kernel_out,
    ):
        """Rows sorted by expert through one grouped matmul a projection:
        no padding, and no per-row copy of any expert's weights."""
        bias = self._first_projection()[1]
        bias_out, scale, expert = self.bias_out, None, None
        integers = isinstance(kernel, _IntKernel)
        if self.use_bias or self.use_output_scale or integers:
            # Rows past the groups borrow the last expert's bias and
            # scales; the dispatch never reads their outputs.
            expert = ops.minimum(
                kernels.row_groups(sizes, ops.shape(rows)[0]),
                self.num_experts - 1,
            )
            bias = _take(bias, expert, custom)
            bias_out = _take(bias_out, expert, custom)
            scale = _take(self.output_scale, expert, custom)
        if row_weights is not None:
            row_weights = ops.cast(row_weights, self.compute_dtype)
        implementation = implementation or "reference"

        def grouped(x, weight):
            return kernels.grouped_matmul(x, weight, sizes, implementation)

        def matmul(x, weight):
            if isinstance(weight, _IntKernel):
                return weight.grouped_matmul(
                    x, sizes, implementation, expert, custom
                )
            if isinstance(weight, _Float8Kernel):
                return weight.project(x, grouped)
            return grouped(x, weight)

        return self._mlp(
            rows,
            kernel,
            bias,
            kernel_out,
            bias_out,
            row_weights,
            custom,
            matmul,
            out_scale=None if scale is None else scale[:, None],
        )

    def _mlp(
        self,
        x,
        kernel,
        bias,
        kernel_out,
        bias_out,
        row_weights=None,
        custom_gradient=True,
        matmul=None,
        out_scale=None,
    ):
        """One expert's `[tokens, features]`, or a batch of groups with
        leading axes on every argument, or rows sorted by expert with a
        grouped `matmul`. `row_weights` (`[..., tokens]`) scales each
        row's output, and so does `out_scale` (the expert's output scale,
        broadcast to the output). The kernels are float tensors or
        quantized kernels (`_IntKernel`, `_Float8Kernel`)."""
        if matmul is None:

            def matmul(x, kernel):
                return _matmul(x, kernel, custom_gradient)

        h = matmul(x, kernel)
        if bias is not None:
            h = h + bias
        # Scaling the hidden activations, before the down projection, is
        # the same as scaling the output, and fuses into the activation.
        out = self._activate(h, row_weights, custom_gradient)
        if kernel_out is not None:
            out = matmul(out, kernel_out)
            if bias_out is not None:
                if row_weights is not None:
                    bias_out = bias_out * row_weights[..., None]
                out = out + bias_out
        if out_scale is not None:
            out = out * out_scale
        return out

    def compute_output_spec(
        self,
        inputs,
        grouped=False,
        group_experts=None,
        group_weights=None,
        batched=None,
        group_sizes=None,
        implementation=None,
        training=None,
    ):
        shape = tuple(inputs.shape[:-1])
        shape += (self.units,) if grouped else (self.num_experts, self.units)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "units": self.units,
                "hidden_units": self.hidden_units,
                "activation": keras.activations.serialize(self.activation),
                "gated": self.gated,
                "glu_alpha": self.glu_alpha,
                "glu_limit": self.glu_limit,
                "use_bias": self.use_bias,
                "use_output_scale": self.use_output_scale,
            }
        )
        config.update(
            _config.weight_options(self, _config.EXPERT_WEIGHT_OPTIONS)
        )
        if self.quantization_config is not None:
            config["quantization_config"] = keras.saving.serialize_keras_object(
                self.quantization_config
            )
        return config
