"""Model I/O for `autoinit-tf convert`: format detection, loaders, Keras-2 config fix-ups, atomic saving.

Formats (see `detect_format`):

* ``keras``: a Keras 3 ``.keras`` archive (full round trip; this package's layers are registered).
* ``h5``: a legacy HDF5 file written by Keras 2 (tf_keras) or Keras 3. The architecture comes from the
  ``model_config`` attribute; Keras-2 configs get `fix_keras2_config`.
* ``saved_model``: a Keras-2 SavedModel directory. The architecture comes from ``keras_metadata.pb``,
  parsed with the protobuf library (`read_keras_metadata`), then fixed up.
* ``json``: a model config from ``model.to_json()`` (Keras 2 or 3) or a ``{"class_name", "config"}`` dict.

A Keras-3 ``model.export()`` SavedModel holds no architecture and is refused with an explanation.

`load` returns a `LoadedModel`: a freshly initialized Keras 3 model built from the architecture, and a
lazy source of the stored weights (used for ``--keep-weights-of``). The input is never modified.
`save_keras` writes atomically (temporary file beside the target, then rename) and refuses to replace an
existing path unless ``overwrite=True``.

TensorFlow-specific code (the TFOpLambda stand-in, reading SavedModel variables) is in
`autoinit_tf.formats_tf`.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import json
import logging
import os
import tempfile
import zipfile

from autoinit_tf import io_utils

logger = logging.getLogger("autoinit_tf.formats")

__all__ = [
    "FORMATS",
    "ConversionError",
    "LoadedModel",
    "detect_format",
    "fix_keras2_config",
    "load",
    "load_custom_objects",
    "read_keras_metadata",
    "save_keras",
    "export_saved_model",
    "check_writable",
]

FORMATS = ("keras", "h5", "saved_model", "json")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_MODEL_CLASSES = {"Functional", "Sequential", "Model"}
_BUILTIN_EXTRA = {"Functional", "Sequential", "Model", "InputLayer", "TFOpLambda", "SlicingOpLambda"}


class ConversionError(Exception):
    """A model could not be read, converted or written. The message says why and what to do."""


# -- detection --------------------------------------------------------------------------------------


def detect_format(path) -> str:
    """``keras`` | ``h5`` | ``saved_model`` | ``json`` from the content (magic bytes), else the extension."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"Input '{path}' does not exist.")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")) or os.path.exists(
            os.path.join(path, "saved_model.pbtxt")
        ):
            return "saved_model"
        raise ConversionError(
            f"'{path}' is a directory but not a SavedModel: it has no saved_model.pb. Pass a SavedModel "
            "directory, a .keras file, a .h5 file or a JSON model config."
        )
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "keras"
    if head.startswith(_HDF5_MAGIC):
        return "h5"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    ext = os.path.splitext(path)[1].lower()
    by_ext = {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".json": "json"}
    if ext in by_ext:
        raise ConversionError(
            f"'{path}' has the extension {ext} but its content is not a valid {by_ext[ext]} file "
            "(the file is empty, truncated or corrupted)."
        )
    raise ConversionError(
        f"Cannot tell the format of '{path}': it is not a .keras (zip) archive, an HDF5 file, a JSON "
        "config or a SavedModel directory. Use --input-format to force one."
    )


# -- keras_metadata.pb -----------------------------------------------------------------------------

_METADATA_CLASS = None


def _saved_metadata_class():
    """The ``SavedMetadata`` protobuf message class (tf_keras's ``saved_metadata.proto``), built from its
    descriptor with the protobuf library so that neither tf_keras nor TF internals are needed."""
    global _METADATA_CLASS
    if _METADATA_CLASS is not None:
        return _METADATA_CLASS
    from google.protobuf import descriptor_pb2, descriptor_pool

    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.21
        from google.protobuf.message_factory import MessageFactory

        GetMessageClass = None  # noqa: N806

    pkg = "autoinit_tf.keras2"
    fd = descriptor_pb2.FileDescriptorProto(name="autoinit_tf/keras2_saved_metadata.proto", package=pkg,
                                            syntax="proto3")
    ver = fd.message_type.add(name="VersionDef")
    F = descriptor_pb2.FieldDescriptorProto  # noqa: N806
    ver.field.add(name="producer", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    ver.field.add(name="min_consumer", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    ver.field.add(name="bad_consumers", number=3, type=F.TYPE_INT32, label=F.LABEL_REPEATED)
    obj = fd.message_type.add(name="SavedObject")
    obj.field.add(name="node_id", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    obj.field.add(name="node_path", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    obj.field.add(name="identifier", number=4, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    obj.field.add(name="metadata", number=5, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    obj.field.add(name="version", number=6, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                  type_name=f".{pkg}.VersionDef")
    meta = fd.message_type.add(name="SavedMetadata")
    meta.field.add(name="nodes", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                   type_name=f".{pkg}.SavedObject")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    desc = pool.FindMessageTypeByName(f"{pkg}.SavedMetadata")
    if GetMessageClass is not None:
        _METADATA_CLASS = GetMessageClass(desc)
    else:  # pragma: no cover - old protobuf
        _METADATA_CLASS = MessageFactory(pool).GetPrototype(desc)
    return _METADATA_CLASS


def _tuple_hook(obj):
    if obj.get("class_name") == "__tuple__" and set(obj) == {"class_name", "items"}:
        return list(obj["items"])
    return obj


def read_keras_metadata(saved_model_dir) -> dict:
    """The root model's ``{"class_name", "config"}`` from a Keras-2 SavedModel's ``keras_metadata.pb``."""
    path = os.path.join(os.fspath(saved_model_dir), "keras_metadata.pb")
    if not os.path.exists(path):
        raise ConversionError(
            f"'{saved_model_dir}' is a SavedModel without keras_metadata.pb, so it holds no Keras "
            "architecture: it was most likely written by Keras 3's model.export() (or tf.saved_model.save), "
            "which keeps only the serving graph. Keras 3 can wrap it for inference only "
            "(keras.layers.TFSMLayer), not rebuild or re-initialize it. Save the model with "
            "model.save('model.keras') in the program that created it and convert that file instead."
        )
    from google.protobuf.message import DecodeError

    cls = _saved_metadata_class()
    msg = cls()
    try:
        with open(path, "rb") as fh:
            msg.ParseFromString(fh.read())
    except DecodeError as exc:
        raise ConversionError(f"'{path}' is corrupted or truncated (protobuf: {exc}).") from exc
    root = [n for n in msg.nodes if n.node_path == "root"]
    if not root:
        raise ConversionError(f"'{path}' has no root object: the file is truncated or not Keras metadata.")
    try:
        meta = json.loads(root[0].metadata, object_hook=_tuple_hook)
    except ValueError as exc:
        raise ConversionError(f"The root metadata in '{path}' is not valid JSON (corrupted file): {exc}") from exc
    if "config" not in meta or meta.get("class_name") not in _MODEL_CLASSES and not isinstance(
        meta.get("config"), dict
    ):
        raise ConversionError(
            f"The root object of '{path}' ({meta.get('class_name')}) has no serializable config: a subclassed "
            "Keras 2 model without get_config() cannot be rebuilt. Save it as .keras after adding get_config()."
        )
    return {"class_name": meta["class_name"], "config": meta["config"]}


# -- Keras-2 config fix-ups ------------------------------------------------------------------------

# TFOpLambda functions that become a plain Keras 3 Activation layer (exact AutoInit rules then apply).
_ACTIVATION_OPS = {
    "nn.relu": "relu", "nn.relu6": "relu6", "nn.elu": "elu", "nn.selu": "selu", "nn.gelu": "gelu",
    "nn.silu": "silu", "nn.swish": "silu", "nn.sigmoid": "sigmoid", "math.sigmoid": "sigmoid",
    "sigmoid": "sigmoid", "nn.tanh": "tanh", "math.tanh": "tanh", "tanh": "tanh",
    "nn.softplus": "softplus", "math.softplus": "softplus", "nn.softsign": "softsign",
}


def _is_model_entry(layer):
    return layer.get("class_name") in _MODEL_CLASSES or (
        isinstance(layer.get("config"), dict) and "layers" in layer["config"]
        and isinstance(layer["config"]["layers"], list)
    )


def _is_flat_node(node):
    return isinstance(node, list) and len(node) >= 3 and isinstance(node[0], str)


def fix_keras2_config(config, *, notes=None):
    """A Keras 3-loadable copy of a Keras 2 model config (``{"class_name", "config"}``).

    1. Pops per-layer ``module`` and ``registered_name`` (a registered name such as ``my>Scale`` becomes
       the ``class_name``).
    2. Wraps TFOpLambda's flat inbound node ``[name, 0, 0, {kwargs}]`` as ``[[...]]``; a TFOpLambda whose
       function is a plain activation (``nn.relu``) becomes an ``Activation`` layer, others the
       `autoinit_tf.formats_tf.TFOpLambda` stand-in.
    3. Decrements the node index of references to nested Functional/Sequential models (Keras 2 nested
       models own an extra node #0; Keras 3 ones don't).
    4. Recurses into nested models.

    `notes` (a list) gets one line per kind of fix applied.
    """
    notes = notes if notes is not None else []
    out = copy.deepcopy(config)
    _fix_model(out, notes, top=True)
    seen, uniq = set(), []
    for n in notes:
        if n not in seen:
            seen.add(n)
            uniq.append(n)
    notes[:] = uniq
    return out


def _fix_entry(entry, notes):
    if not isinstance(entry, dict):
        return
    reg = entry.pop("registered_name", None)
    if entry.pop("module", None) is not None or reg is not None:
        notes.append("removed per-layer module/registered_name keys")
    if reg and ">" in str(reg):
        entry["class_name"] = reg
    if entry.get("class_name") in _MODEL_CLASSES or (
        isinstance(entry.get("config"), dict) and isinstance(entry["config"].get("layers"), list)
    ):
        _fix_model(entry, notes, top=False)


def _fix_model(model_cfg, notes, top):
    cfg = model_cfg.get("config")
    if isinstance(model_cfg, dict):
        model_cfg.pop("module", None)
        model_cfg.pop("registered_name", None)
    if isinstance(cfg, list):  # very old Sequential: a bare list of layers
        model_cfg["config"] = cfg = {"name": model_cfg.get("name", "sequential"), "layers": cfg}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list):
        return
    layers = cfg["layers"]
    nested = {ly.get("config", {}).get("name", ly.get("name")) for ly in layers if isinstance(ly, dict)
              and _is_model_entry(ly)}
    nested |= {ly.get("name") for ly in layers if isinstance(ly, dict) and _is_model_entry(ly)}
    nested.discard(None)
    nested_seq = {ly.get("name") or ly.get("config", {}).get("name") for ly in layers
                  if isinstance(ly, dict) and ly.get("class_name") == "Sequential"}
    for ly in layers:
        _fix_entry(ly, notes)
        if not isinstance(ly, dict):
            continue
        nodes = ly.get("inbound_nodes")
        if isinstance(nodes, list) and nodes and _is_flat_node(nodes):
            nodes = [nodes]
        if isinstance(nodes, list) and any(_is_flat_node(n) for n in nodes):
            ly["inbound_nodes"] = nodes = [[n] if _is_flat_node(n) else n for n in nodes]
            notes.append("wrapped flat TFOpLambda inbound nodes")
        if ly.get("class_name") in ("TFOpLambda", "SlicingOpLambda"):
            _fix_tfop(ly, notes)
        if isinstance(nodes, list):
            for node in nodes:
                if not isinstance(node, list):
                    continue  # a Keras 3 node dict
                for ref in node:
                    if _is_flat_node(ref) and ref[0] in nested and isinstance(ref[1], int) and ref[1] > 0:
                        ref[1] -= 1
                        notes.append("shifted node indices of references to nested models")
    # Input/output refs: Keras 3's get_tensor() shifts refs to nested Functional models itself, not
    # to nested Sequential ones.
    for key in ("input_layers", "output_layers"):
        refs = cfg.get(key)
        if isinstance(refs, list):
            flat = [refs] if _is_flat_node(refs) else refs
            for ref in flat:
                if _is_flat_node(ref) and ref[0] in nested_seq and isinstance(ref[1], int) and ref[1] > 0:
                    ref[1] -= 1
                    notes.append("shifted node indices of references to nested models")


def _fix_tfop(ly, notes):
    cfg = ly.setdefault("config", {})
    fn = cfg.get("function")
    nodes = ly.get("inbound_nodes") or []
    refs = [r for node in nodes if isinstance(node, list) for r in node if _is_flat_node(r)]
    single = len(nodes) == 1 and len(refs) == 1
    flat_ref = refs[0] if single else None
    kwargs = (flat_ref[3] if flat_ref is not None and len(flat_ref) > 3 else {}) or {}
    only_name = all(k == "name" for k in kwargs)
    if fn in _ACTIVATION_OPS and single and only_name and ly.get("class_name") == "TFOpLambda":
        ly["class_name"] = "Activation"
        ly["config"] = {"name": cfg.get("name", ly.get("name")), "trainable": cfg.get("trainable", True),
                        "dtype": cfg.get("dtype", "float32"), "activation": _ACTIVATION_OPS[fn]}
        if flat_ref is not None and len(flat_ref) > 3:
            flat_ref[3] = {}
        notes.append(f"mapped TFOpLambda tf.{fn} to an Activation('{_ACTIVATION_OPS[fn]}') layer")
    else:
        ly["class_name"] = "autoinit_tf>TFOpLambda"
        from autoinit_tf import formats_tf  # noqa: F401  (registers the stand-in)

        notes.append(f"TFOpLambda tf.{fn} runs through the autoinit_tf>TFOpLambda stand-in")


def _is_keras3_config(config) -> bool:
    """A Keras 3 functional config has dict nodes ({"args": ...}); Keras 2 has lists of lists."""
    version = str(config.get("keras_version", ""))
    if version.startswith("3"):
        return True
    if version.startswith(("1.", "2.")):
        return False

    def walk(cfg):
        inner = cfg.get("config") if isinstance(cfg, dict) else None
        if not isinstance(inner, dict):
            return None
        for ly in inner.get("layers", []) or []:
            if not isinstance(ly, dict):
                continue
            for node in ly.get("inbound_nodes") or []:
                if isinstance(node, dict):
                    return True
                if isinstance(node, list):
                    return False
            sub = walk(ly)
            if sub is not None:
                return sub
        return None

    found = walk(config)
    if found is not None:
        return found
    # Sequential or layer-free configs: Keras 3 writes build_config / per-layer module "keras.layers".
    return "build_config" in config or any(
        isinstance(ly, dict) and "build_config" in ly
        for ly in ((config.get("config") or {}).get("layers") or [] if isinstance(config.get("config"), dict)
                   else [])
    )


# -- scanning configs ------------------------------------------------------------------------------


def iter_layer_entries(config):
    """Yield every layer entry (dict with ``class_name``) of a model config, recursively: the layers of
    nested models and the layers wrapped by TimeDistributed / Bidirectional / any wrapper (``layer``,
    ``forward_layer``, ``backward_layer``, ``cell``, ``cells``)."""
    inner = config.get("config") if isinstance(config, dict) else None
    if not isinstance(inner, dict):
        return
    children = []
    layers = inner.get("layers")
    if isinstance(layers, list):
        children.extend(layers)
    for key in ("layer", "forward_layer", "backward_layer", "cell"):
        if isinstance(inner.get(key), dict):
            children.append(inner[key])
    if isinstance(inner.get("cells"), list):
        children.extend(inner["cells"])
    for ly in children:
        if isinstance(ly, dict) and "class_name" in ly:
            yield ly
            yield from iter_layer_entries(ly)


def _layer_name(entry):
    cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    return entry.get("name") or cfg.get("name") or "?"


def check_lambda(config, allow_lambda):
    lambdas = [_layer_name(e) for e in iter_layer_entries(config) if e.get("class_name") == "Lambda"]
    if lambdas and not allow_lambda:
        raise ConversionError(
            f"The model contains Lambda layer(s) {', '.join(repr(n) for n in lambdas)}. Loading a Lambda layer "
            "runs Python code stored in the file (unsafe deserialization), and Keras 2 Lambda code is Python "
            "bytecode that may not run under this Python version. If you trust the file, pass --allow-lambda; "
            "better, replace the Lambda by a registered custom layer and save the model again."
        )
    if lambdas:
        import keras

        keras.config.enable_unsafe_deserialization()
    return lambdas


def check_known_classes(config, custom_objects):
    """Raise a `ConversionError` naming every layer class that neither Keras nor `custom_objects` know."""
    import keras

    import autoinit_tf.layers  # noqa: F401  (registers this package's layers)

    unknown = {}
    for e in iter_layer_entries(config):
        cls = e.get("class_name")
        if not isinstance(cls, str):
            continue
        reg = e.get("registered_name")
        candidates = [c for c in (reg, cls) if isinstance(c, str)]
        ok = False
        for c in candidates:
            short = c.split(">")[-1]
            if (c in custom_objects or short in custom_objects or c in _BUILTIN_EXTRA
                    or keras.saving.get_registered_object(c) is not None
                    or (">" not in c and hasattr(keras.layers, c))):
                ok = True
                break
            if c.startswith("autoinit_tf>"):
                from autoinit_tf import formats_tf  # noqa: F401

                if keras.saving.get_registered_object(c) is not None:
                    ok = True
                    break
        if not ok:
            unknown.setdefault(reg if isinstance(reg, str) else cls, []).append(_layer_name(e))
    if unknown:
        parts = [f"'{c}' (layer {', '.join(repr(n) for n in names)})" for c, names in unknown.items()]
        raise ConversionError(
            f"Unknown custom layer class {', '.join(parts)}: neither Keras nor autoinit-tf defines it. Pass the "
            "Python module that defines (and ideally registers, with keras.saving.register_keras_serializable) "
            "the class with --custom-objects module.path (or module.path:ClassName), e.g. "
            "--custom-objects my_project.layers; the module must be importable (on PYTHONPATH)."
        )


# -- custom objects --------------------------------------------------------------------------------


def load_custom_objects(specs) -> dict:
    """``["pkg.mod", "pkg.mod:Name"]`` -> ``{name: object}``: every Keras layer/initializer/... class and
    function defined in the module (or the named attribute). Importing the module also runs its
    ``register_keras_serializable`` decorators."""
    import inspect

    out = {}
    for spec in specs or ():
        mod_name, _, attr = str(spec).partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is a user error here
            raise ConversionError(
                f"--custom-objects {spec}: cannot import module '{mod_name}' ({type(exc).__name__}: {exc}). "
                "Pass an importable module path (check PYTHONPATH)."
            ) from exc
        if attr:
            if not hasattr(mod, attr):
                raise ConversionError(f"--custom-objects {spec}: module '{mod_name}' has no attribute '{attr}'.")
            out[attr] = getattr(mod, attr)
            continue
        for name, obj in vars(mod).items():
            if name.startswith("_"):
                continue
            if inspect.isclass(obj) and getattr(obj, "__module__", None) == mod.__name__:
                out[name] = obj
    return out


# -- loading ---------------------------------------------------------------------------------------


class LoadedModel:
    """A model rebuilt from a stored architecture (fresh weights) plus a lazy source of the stored weights.

    Attributes:
        model: the Keras 3 model (new, default-initialized weights).
        format: the detected or forced input format.
        keras2: whether the architecture went through the Keras-2 fix-ups.
        fixups: the fix-ups applied (human-readable lines).
        lambdas: names of Lambda layers (only with ``allow_lambda``).
    """

    def __init__(self, model, fmt, *, keras2=False, fixups=(), weights_loader=None, compile_config=None,
                 lambdas=()):
        self.model = model
        self.format = fmt
        self.keras2 = keras2
        self.fixups = list(fixups)
        self.lambdas = list(lambdas)
        self.compile_config = compile_config
        self._weights_loader = weights_loader
        self._weights = None

    @property
    def has_weights(self) -> bool:
        return self._weights_loader is not None

    def stored_weights(self) -> dict:
        """``{layer name: [numpy arrays in layer.weights order]}`` for every stored layer (loaded once)."""
        if self._weights is None:
            if self._weights_loader is None:
                raise ConversionError(
                    f"The {self.format} input holds no weights (a JSON config is architecture only), so "
                    "--keep-weights-of has nothing to keep."
                )
            self._weights = self._weights_loader()
        return self._weights


    def apply_stored_weights(self, patterns=None) -> list:
        """Copy stored weights into the model's layers (all, or those matching the glob `patterns`).

        Returns the paths of the layers set. Nested models are handled through their own layers.
        """
        import keras

        stored = self.stored_weights()
        done = []
        for path, layer in model_layers(self.model):
            if isinstance(layer, keras.Model) or not layer.weights:
                continue
            if patterns is not None and not _matches(path, layer, patterns):
                continue
            arrays = stored.get(path)
            if arrays is None:
                continue
            try:
                layer.set_weights(arrays)
            except ValueError as exc:
                raise ConversionError(f"The stored weights of layer '{path}' do not fit it: {exc}") from exc
            done.append(path)
        return done


def _matches(path, layer, patterns):
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(layer.name, p) for p in patterns)


def model_layers(model, prefix=""):
    """``[(path, layer)]`` of every layer, recursing into nested models (``outer/inner``)."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        path = f"{prefix}{layer.name}"
        out.append((path, layer))
        if isinstance(layer, keras.Model):
            out.extend(model_layers(layer, prefix=path + "/"))
    return out


def _weights_of_model(model) -> dict:
    return {path: [w.numpy() if hasattr(w, "numpy") else w for w in layer.get_weights()]
            for path, layer in model_layers(model) if layer.weights}


def _build_from_config(config, custom_objects, keras2):
    import keras

    objs = {"Functional": keras.Model, "Model": keras.Model, "Sequential": keras.Sequential}
    objs.update(custom_objects)
    config = copy.deepcopy(config)
    if keras2:
        from keras.src.legacy.saving import saving_utils

        return saving_utils.model_from_config(config, custom_objects=objs)
    return keras.saving.deserialize_keras_object(config, custom_objects=objs)


def _wrap_build_error(exc, what):
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConversionError(f"Could not rebuild the model from {what}: {type(exc).__name__}: {msg}")


def _from_config(config, fmt, custom_objects, allow_lambda, what):
    if not isinstance(config, dict) or "config" not in config or "class_name" not in config:
        raise ConversionError(
            f"{what} is not a Keras model config (expected a JSON object with 'class_name' and 'config', as "
            "written by model.to_json())."
        )
    lambdas = check_lambda(config, allow_lambda)
    keras2 = not _is_keras3_config(config)
    notes = []
    if keras2:
        config = fix_keras2_config(config, notes=notes)
    check_known_classes(config, custom_objects)
    try:
        model = _build_from_config(config, custom_objects, keras2)
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _wrap_build_error(exc, what) from exc
    return model, keras2, notes, lambdas, config


def _load_json(path, custom_objects, allow_lambda):
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh, object_hook=_tuple_hook)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"'{path}' is not valid JSON (truncated or corrupted?): {exc}") from exc
    if isinstance(config, dict) and "config" not in config and "class_name" not in config and "layers" in config:
        config = {"class_name": "Functional", "config": config}
    model, keras2, notes, lambdas, _ = _from_config(config, "json", custom_objects, allow_lambda, f"'{path}'")
    return LoadedModel(model, "json", keras2=keras2, fixups=notes, lambdas=lambdas)


def _read_keras_archive_config(path):
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ConversionError(f"'{path}' is corrupted: member '{bad}' fails its CRC check.")
            with zf.open("config.json") as fh:
                return json.loads(fh.read().decode("utf-8"))
    except ConversionError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
        raise ConversionError(
            f"'{path}' is not a readable .keras archive (truncated or corrupted: {type(exc).__name__}: {exc})."
        ) from exc


def _load_keras(path, custom_objects, allow_lambda):
    import keras

    config = _read_keras_archive_config(path)
    lambdas = check_lambda(config, allow_lambda)
    check_known_classes(config, custom_objects)
    try:
        stored = keras.saving.load_model(path, custom_objects=custom_objects, compile=False,
                                         safe_mode=not allow_lambda)
    except Exception as exc:  # noqa: BLE001
        raise _wrap_build_error(exc, f"'{path}'") from exc
    compile_config = config.get("compile_config") or None
    try:
        model = keras.models.clone_model(stored)
    except Exception as exc:  # noqa: BLE001
        logger.warning("clone_model failed (%s); re-initializing the loaded model itself.", exc)
        model = stored
    return LoadedModel(model, "keras", weights_loader=lambda: _weights_of_model(stored),
                       compile_config=compile_config, lambdas=lambdas)


def _load_h5(path, custom_objects, allow_lambda):
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover
        raise ConversionError("Reading .h5 files needs h5py: pip install h5py") from exc
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            kv = f.attrs.get("keras_version")
            has_weights = "model_weights" in f or "layer_names" in f.attrs
    except OSError as exc:
        raise ConversionError(f"'{path}' is not a readable HDF5 file (truncated or corrupted: {exc}).") from exc
    if raw is None:
        raise ConversionError(
            f"'{path}' holds no model architecture (no 'model_config' attribute): it is a weights-only .h5 "
            "(model.save_weights). Convert the file that holds the whole model, or its JSON config."
        )
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        config = json.loads(raw, object_hook=_tuple_hook)
    except ValueError as exc:
        raise ConversionError(f"The model_config in '{path}' is not valid JSON (corrupted): {exc}") from exc
    if isinstance(kv, bytes):
        kv = kv.decode()
    if kv and str(kv).startswith("3"):
        config.setdefault("keras_version", str(kv))
    model, keras2, notes, lambdas, fixed = _from_config(config, "h5", custom_objects, allow_lambda, f"'{path}'")

    def weights():
        twin = _build_from_config(fixed, {**custom_objects}, keras2)
        try:
            twin.load_weights(path)
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"Could not read the weights stored in '{path}': {type(exc).__name__}: {exc}")
        return _weights_of_model(twin)

    return LoadedModel(model, "h5", keras2=keras2, fixups=notes, lambdas=lambdas,
                       weights_loader=weights if has_weights else None)


def _load_saved_model(path, custom_objects, allow_lambda):
    config = read_keras_metadata(path)
    model, keras2, notes, lambdas, _ = _from_config(config, "saved_model", custom_objects, allow_lambda,
                                                     f"the keras_metadata.pb of '{path}'")

    def weights():
        from autoinit_tf.formats_tf import saved_model_variables

        try:
            store = saved_model_variables(path)
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(
                f"Could not read the variables of SavedModel '{path}': {type(exc).__name__}: {exc}"
            ) from exc
        out = {}
        for lpath, layer in model_layers(model):
            if not layer.weights or isinstance(layer, _keras_model_class()):
                continue
            arrays = []
            for w in layer.weights:
                key = f"{layer.name}/{w.name}"
                if key not in store:
                    arrays = None
                    break
                arrays.append(store[key])
            if arrays is not None:
                out[lpath] = arrays
        return out

    return LoadedModel(model, "saved_model", keras2=True, fixups=notes, lambdas=lambdas, weights_loader=weights)


def _keras_model_class():
    import keras

    return keras.Model


def load(path, *, input_format=None, custom_objects=None, allow_lambda=False) -> LoadedModel:
    """Rebuild the model stored at `path` as a Keras 3 model with fresh weights (see the module doc).

    Raises `ConversionError` with a one-paragraph explanation on any failure. The input is only read.
    """
    import autoinit_tf.layers  # noqa: F401  (register this package's layers)

    path = os.fspath(path)
    fmt = input_format or detect_format(path)
    if fmt not in FORMATS:
        raise ConversionError(f"Unknown input format '{fmt}'; one of: {', '.join(FORMATS)}.")
    if not os.path.exists(path):
        raise ConversionError(f"Input '{path}' does not exist.")
    if fmt == "saved_model" and not os.path.isdir(path):
        raise ConversionError(f"--input-format saved_model needs a directory; '{path}' is a file.")
    if fmt != "saved_model" and os.path.isdir(path):
        raise ConversionError(f"'{path}' is a directory; the {fmt} format is a single file.")
    custom_objects = dict(custom_objects or {})
    loader = {"keras": _load_keras, "h5": _load_h5, "saved_model": _load_saved_model, "json": _load_json}[fmt]
    loaded = loader(path, custom_objects, allow_lambda)
    for line in loaded.fixups:
        logger.info("Keras-2 fix-up: %s", line)
    return loaded


def layers_matching(model, patterns):
    """``[(path, layer)]`` whose name or nested path matches one of the glob patterns."""
    return [(path, layer) for path, layer in model_layers(model) if _matches(path, layer, patterns)]


# -- writing ---------------------------------------------------------------------------------------


def check_writable(target, *, overwrite=False, what="output"):
    """Raise a `ConversionError` unless `target` can be created (or replaced with `overwrite`)."""
    target = os.fspath(target)
    parent = os.path.dirname(os.path.abspath(target))
    if os.path.lexists(target) and not overwrite:
        raise ConversionError(f"The {what} '{target}' already exists; pass --overwrite to replace it.")
    if not os.path.isdir(parent):
        raise ConversionError(f"Cannot write the {what} '{target}': the directory '{parent}' does not exist.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".autoinit-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConversionError(
            f"Cannot write the {what} '{target}': the directory '{parent}' is not writable ({exc.strerror})."
        ) from exc


def save_keras(model, target, *, overwrite=False):
    """Save `model` as a ``.keras`` archive at `target`: written to a pid-tagged temporary file in the
    same directory, then published atomically and, without `overwrite`, exclusively (two concurrent
    writers cannot both win); temporaries of earlier killed runs in that directory are removed first."""
    target = os.fspath(target)
    check_writable(target, overwrite=overwrite)
    if os.path.isdir(target):
        raise ConversionError(f"The output '{target}' is a directory; give a file name ending in .keras.")
    return _write_then_publish(target, model.save, overwrite=overwrite, what="output", suffix=".keras")


def export_saved_model(model, target, *, overwrite=False):
    """``model.export(target)`` (a serving SavedModel), written to a temporary directory then published
    as `save_keras` publishes."""
    target = os.fspath(target)
    check_writable(target, overwrite=overwrite, what="SavedModel directory")

    def write(tmp):
        os.rmdir(tmp)  # model.export creates the directory itself
        model.export(tmp, verbose=False)

    return _write_then_publish(target, write, overwrite=overwrite, what="SavedModel directory", suffix="-export",
                               folder=True)


def _write_then_publish(target, write, *, overwrite, what, suffix, folder=False):
    """``write(tmp)`` into a pid-tagged temporary beside `target`, then `io_utils.publish` it; the
    temporary is removed whatever happens."""
    parent = os.path.dirname(os.path.abspath(target))
    io_utils.clean_stale_temps(parent)
    try:
        with io_utils.temporary(parent, suffix=suffix, folder=folder) as tmp:
            write(tmp)
            io_utils.publish(tmp, target, overwrite=overwrite)
    except FileExistsError as exc:
        raise ConversionError(
            f"The {what} '{target}' appeared while it was being written (another process?); nothing was "
            "replaced. Pass --overwrite to replace it."
        ) from exc
    except Exception as exc:
        if isinstance(exc, ConversionError):
            raise
        raise ConversionError(f"Could not write the {what} '{target}': {type(exc).__name__}: {exc}") from exc
    return target
