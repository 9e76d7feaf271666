"""A bank of dense experts stored as stacked weights."""

import keras
import numpy as np
from keras import ops

from moe_keras import _config
from moe_keras import _validation
from moe_keras import dispatch as dispatch_lib
from moe_keras import kernels


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


def _take(weight, indices, custom_gradient=True):
    """`weight[indices]` along the experts axis, with a dense gradient.

    Autodiff of a gather gives TensorFlow an `IndexedSlices` gradient with
    one slice per block, so an expert with several blocks repeats its
    index. Optimizers that square or normalise the gradient (Adam,
    RMSprop, Adafactor, Lion) apply such slices one at a time instead of
    to their sum, and move the weight by the wrong amount. The backward
    here sums the blocks of each expert first, as one dense tensor.
    """
    if weight is None:
        return None
    if not custom_gradient:
        return ops.take(weight, indices, axis=0)
    num_experts = ops.shape(weight)[0]

    def forward(weight):
        def backward(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return ops.segment_sum(upstream, indices, num_segments=num_experts)

        return ops.take(weight, indices, axis=0), backward

    # A read of the variable, not the variable: TensorFlow's eager custom
    # gradient would otherwise ask for the gradient of variables it reads.
    return ops.custom_gradient(forward)(ops.copy(weight))


@keras.saving.register_keras_serializable(package="moe_keras")
class DenseExperts(keras.layers.Layer):
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

    def weight_names(self):
        """The names of the weights `build` makes, `[E, ...]` each."""
        prefixes = ("",) if self.hidden_units is None else ("in_", "out_")
        kinds = ("kernel", "bias") if self.use_bias else ("kernel",)
        names = [f"{p}{kind}" for p in prefixes for kind in kinds]
        return names + (["output_scale"] if self.use_output_scale else [])

    def _projection(self, name, fan_in, fan_out):
        kernel = self.add_weight(
            name=f"{name}kernel",
            shape=(self.num_experts, fan_in, fan_out),
            initializer=_per_expert_initializer(
                self.kernel_initializer, self.num_experts
            ),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
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
        first_units = self.hidden_units or self.units
        # A GLU's gate and up halves live side by side in one kernel.
        width = 2 * first_units if self.gated else first_units
        if self.hidden_units is None:
            self.kernel, self.bias = self._projection("", features, width)
            self.kernel_out = self.bias_out = None
        else:
            self.kernel_in, self.bias_in = self._projection(
                "in_", features, width
            )
            self.kernel_out, self.bias_out = self._projection(
                "out_", self.hidden_units, self.units
            )
        self.output_scale = None
        if self.use_output_scale:
            self.output_scale = self.add_weight(
                name="output_scale",
                shape=(self.num_experts,),
                initializer="ones",
            )

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
        if grouped and group_sizes is not None:
            return self._sorted_rows(
                inputs, group_sizes, group_weights, implementation, custom
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
            return self._grouped(
                inputs, group_experts, group_weights, custom, batched
            )
        # Every expert on every position. Flattened to plain matmuls: an
        # einsum with an ellipsis here makes TensorFlow broadcast to
        # [tokens, experts, features, hidden] before contracting.
        shape = ops.shape(inputs)
        x = ops.reshape(inputs, (-1, shape[-1]))  # [tokens, features]
        kernel, bias = self._first_projection()
        width = ops.shape(kernel)[-1]
        # [features, experts * width]: all first projections in one matmul.
        stacked = ops.reshape(ops.transpose(kernel, (1, 0, 2)), (shape[-1], -1))
        h = ops.reshape(ops.matmul(x, stacked), (-1, self.num_experts, width))
        if bias is not None:
            h = h + bias  # [tokens, experts, width]
        h = self._activate(h, custom_gradient=custom)
        if self.hidden_units is not None:
            h = ops.einsum("teh,ehu->teu", h, self.kernel_out)
            if self.bias_out is not None:
                h = h + self.bias_out
        if self.output_scale is not None:
            h = h * ops.cast(self.output_scale, h.dtype)[:, None]
        return ops.reshape(
            h, tuple(shape[:-1]) + (self.num_experts, self.units)
        )

    def _grouped(self, inputs, group_experts, group_weights, custom, batched):
        kernel, bias = self._first_projection()
        kernel_out, bias_out = self.kernel_out, self.bias_out
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

    def _sorted_rows(self, rows, sizes, row_weights, implementation, custom):
        """Rows sorted by expert through one grouped matmul a projection:
        no padding, and no per-row copy of any expert's weights."""
        kernel, bias = self._first_projection()
        bias_out, scale = self.bias_out, None
        if self.use_bias or self.use_output_scale:
            # Rows past the groups borrow the last expert's bias and scale;
            # the dispatch never reads their outputs.
            expert = ops.minimum(
                kernels.row_groups(sizes, ops.shape(rows)[0]),
                self.num_experts - 1,
            )
            bias = _take(bias, expert, custom)
            bias_out = _take(bias_out, expert, custom)
            scale = _take(self.output_scale, expert, custom)
        if row_weights is not None:
            row_weights = ops.cast(row_weights, self.compute_dtype)

        def matmul(x, weight):
            return kernels.grouped_matmul(
                x, weight, sizes, implementation or "reference"
            )

        return self._mlp(
            rows,
            kernel,
            bias,
            self.kernel_out,
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
        matmul=ops.matmul,
        out_scale=None,
    ):
        """One expert's `[tokens, features]`, or a batch of groups with
        leading axes on every argument, or rows sorted by expert with a
        grouped `matmul`. `row_weights` (`[..., tokens]`) scales each
        row's output, and so does `out_scale` (the expert's output scale,
        broadcast to the output)."""
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
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class ExpertList(keras.layers.Layer):
    """Any Keras layers as experts, possibly of different sizes.

    Each expert maps `(tokens, features)` to `(tokens, units)` with the same
    `units` for all; inside, they can be anything (an MLP of another width,
    a residual block...). They run one after another, each on its own
    static-shape group of tokens, so dense and capacity-based dispatch both
    work; dropless sparse dispatch needs stacked weights and does not.
    `MoE(experts=[...])` makes one.

    Args:
        experts: non-empty list (or tuple) of Keras layers, or of their
            serialized configs. A `ValueError` if empty, a `TypeError` if
            one is not a layer.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: float tensor, see the input shapes below.
        grouped: bool. `False` (default): every expert on every position.
            `True`: one group of tokens per expert.
        group_experts: must be `None`: blocks of one expert's tokens (the
            dropless dispatch) need stacked weights, and are a `ValueError`.

    Input shape:
        `(..., features)`; with `grouped=True`, `(num_experts, tokens,
        features)`.

    Output shape:
        `(..., num_experts, units)`; with `grouped=True`, `(num_experts,
        tokens, units)`.

    Example:

    >>> experts = ExpertList([keras.layers.Dense(2), keras.layers.Dense(2)])
    >>> tuple(experts(np.zeros((5, 3), "float32")).shape)
    (5, 2, 2)

    As the experts of an `MoE` layer (here a dense mixture), one of them
    a small MLP:

    >>> mlp = keras.Sequential([keras.layers.Dense(4, "relu"),
    ...                         keras.layers.Dense(2)])
    >>> layer = MoE(experts=[keras.layers.Dense(2), mlp])
    >>> tuple(layer(np.zeros((6, 5), "float32")).shape)
    (6, 2)
    """

    def __init__(self, experts, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(experts, (list, tuple)) or not experts:
            raise ValueError(
                "`experts` must be a non-empty list of Keras layers; "
                f"received experts={experts!r}."
            )
        experts = [
            keras.saving.deserialize_keras_object(e)
            if isinstance(e, dict)
            else e
            for e in experts
        ]
        for i, expert in enumerate(experts):
            if not isinstance(expert, keras.layers.Layer):
                raise TypeError(
                    f"`experts[{i}]` must be a Keras layer; received "
                    f"{expert!r} (of type {type(expert).__name__})."
                )
        self.expert_layers = list(experts)
        self.num_experts = len(experts)
        self.units = None

    def build(self, input_shape):
        features = _validation.feature_dim(input_shape, self.name)
        self.input_spec = _validation.features_spec(features)
        widths = []
        for expert in self.expert_layers:
            if not expert.built:
                expert.build((None, features))
            spec = expert.compute_output_spec(
                keras.KerasTensor((None, features))
            )
            widths.append(spec.shape[-1])
        if len(set(widths)) != 1 or widths[0] is None:
            raise ValueError(
                "Every expert must map (tokens, features) to (tokens, units) "
                f"with the same units; received output widths {widths}."
            )
        self.units = int(widths[0])

    def call(self, inputs, grouped=False, group_experts=None):
        if group_experts is not None:
            raise ValueError(
                "Dropless dispatch needs stacked expert weights; with a list "
                "of expert layers use a capacity_factor or dispatch='dense'."
            )
        if grouped:
            # [experts, tokens, features] -> [experts, tokens, units]
            return ops.stack(
                [
                    expert(inputs[i])
                    for i, expert in enumerate(self.expert_layers)
                ]
            )
        shape = ops.shape(inputs)
        x = ops.reshape(inputs, (-1, shape[-1]))
        out = ops.stack([expert(x) for expert in self.expert_layers], axis=1)
        return ops.reshape(
            out, tuple(shape[:-1]) + (self.num_experts, self.units)
        )

    def compute_output_spec(self, inputs, grouped=False, group_experts=None):
        shape = tuple(inputs.shape[:-1])
        shape += (self.units,) if grouped else (self.num_experts, self.units)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["experts"] = [
            keras.saving.serialize_keras_object(e) for e in self.expert_layers
        ]
        return config
