"""DALI failures say what failed: a bad file (decode), memory, or pipeline setup; nothing else is called a bad file."""
import pytest

from engine.errors import ConfigError
from engine.loaders.dali_loader import classify_dali_error, dali_error

TRACE = ("which was used in the pipeline definition with the following traceback:\n\n"
         "  File \"engine/loaders/dali_loader.py\", line 93, in _pipeline\n"
         "    views = [fn.resize(fn.decoders.image_random_crop(\n\n")


def _runtime(operator: str, device: str, detail: str, building: bool = False) -> str:
    """DALI 2.x's message layout for an operator failure (as DALI 2.4 printed the real ones below)."""
    banner = "Critical error when building pipeline:\n" if building else "Critical error in pipeline:\n" * 2
    return (f"{banner}Error in {device} operator `nvidia.dali.fn.{operator}`,\n{TRACE}encountered:\n\n{detail}\n"
            f"C++ context: [/opt/dali/dali/x.h:1] \nCurrent pipeline object is no longer valid.")


# Recorded from DALI 2.4 on this CPU (a non-image file; loader device_id=0 without CUDA; random_resized_crop
# with an empty aspect-ratio range; crop_mirror_normalize with mean/std of different lengths).
REAL = {
    "decode": ("Critical error in pipeline:\nCritical error in pipeline:\nError in CPU operator "
               "`nvidia.dali.fn.decoders.image`,\nwhich was used in the pipeline definition with the following "
               "traceback:\n\n  File \"engine/loaders/dali_loader.py\", line 145, in _pipeline\n    images = "
               "fn.decoders.image(data, device=decode_device, output_type=color) if encoded else data\n\n"
               "encountered:\n\nnvImageCodec failure: '#4'\nCurrent pipeline object is no longer valid.\n"
               "Current pipeline object is no longer valid."),
    "setup": ("Assert on \"!params.device_id.has_value() || cuInitChecked()\" failed: You are trying to create "
              "a GPU DALI pipeline while CUDA is not available. Please install CUDA or set `device_id = None` in "
              "Pipeline constructor. If running inside Docker container, you may need to use  `--gpus` option."),
    "setup (operator argument)": (
        "Critical error when building pipeline:\nError in CPU operator `nvidia.dali.fn.random_resized_crop`,\n"
        "which was used in the pipeline definition with the following traceback:\n\n  File \"engine/loaders/"
        "dali_loader.py\", line 99, in _pipeline\n    views = [fn.random_resized_crop(images, size=(size, size), "
        "antialias=True, **crop)\n\nencountered:\n\nAssert on \"aspect_ratio[0] <= aspect_ratio[1]\" failed: "
        "Provided empty range\nC++ context: [/opt/dali/dali/operators/image/crop/random_crop_attr.h:46] \n"
        "Current pipeline object is no longer valid."),
    "other": ("Critical error in pipeline:\nCritical error in pipeline:\nError in CPU operator "
              "`nvidia.dali.fn.crop_mirror_normalize`,\n" + TRACE + "encountered:\n\nAssert on \"mean_arg.size() "
              "== std_arg.size()\" failed: ``mean`` and ``std`` must either be of the same size, be scalars, or "
              "one of them can be a vector and the other a scalar.\nC++ context: [/opt/dali/dali/operators/image/"
              "crop/crop_mirror_normalize.h:125] \nCurrent pipeline object is no longer valid."),
}


@pytest.mark.parametrize("message,kind", [
    (REAL["decode"], "decode"),
    (_runtime("decoders.image", "MIXED", "nvJPEG error: Unsupported image type"), "decode"),
    (_runtime("decoders.image_random_crop", "CPU", "Unrecognized image format"), "decode"),
    (_runtime("decoders.image", "MIXED", "CUDA allocation failed"), "memory"),  # a decoder's OOM is not a bad file
    (_runtime("resize", "GPU", "Can't allocate 1073741824 bytes on device 0."), "memory"),
    ("Can't allocate 4096 bytes on host.", "memory"),
    ("std::bad_alloc", "memory"),
    (REAL["setup"], "setup"),
    (REAL["setup (operator argument)"], "setup"),
    (_runtime("decoders.image", "MIXED", "Invalid argument output_type", building=True), "setup"),
    ("dlopen libcuda.so failed. Please install GPU driver.", "setup"),
    (REAL["other"], "other"),  # the quoted traceback names fn.decoders..., which is no decode error
])
def test_classify_dali_error(message, kind):
    assert classify_dali_error(message) == kind


def test_only_decode_errors_blame_the_files():
    where = "imagefolder train split"
    decode = dali_error(RuntimeError(REAL["decode"]), where)
    assert isinstance(decode, ConfigError) and "\n" not in str(decode)
    assert "could not decode an image of imagefolder train split" in str(decode)
    assert "nvidia.dali.fn.decoders.image: nvImageCodec failure: '#4'" in str(decode)
    assert "data.verify=full" in str(decode)
    memory = dali_error(RuntimeError(_runtime("decoders.image", "MIXED", "CUDA allocation failed")), where)
    assert isinstance(memory, ConfigError) and "ran out of memory" in str(memory) and "verify" not in str(memory)
    setup = dali_error(RuntimeError(REAL["setup"]), where)
    assert isinstance(setup, ConfigError) and "could not build its pipeline" in str(setup)
    assert "not a bad file" in str(setup) and "\n" not in str(setup)
    other = RuntimeError(REAL["other"])
    assert dali_error(other, where) is other  # raised as is, with its traceback


def test_a_corrupt_file_is_reported_as_a_decode_error(png_tree, tmp_path):
    import shutil

    from engine.data import DataConfig, build_data
    from engine.loaders import LoaderSpec, build_loader

    tree = tmp_path / "tree"
    shutil.copytree(png_tree, tree)
    bundle = build_data(DataConfig(name="imagefolder", root=str(tree), image_size=32, verify="none",
                                   mean=[0.5] * 3, std=[0.25] * 3))
    bundle.test.files[3].write_bytes(b"not an image" * 20)
    with pytest.raises(ConfigError, match="DALI could not decode an image of imagefolder test split"):
        list(build_loader("dali", bundle, "test", LoaderSpec(batch_size=4, num_workers=1), 0, 1))
