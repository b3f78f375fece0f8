"""Self-check of `hf_common`: the sdist tests are cached, built safely, and really run (and fail) on a tiny CLIP."""

import concurrent.futures
import dataclasses
import io
import os
import random
import shutil
import sys
import tarfile
import unittest

import pytest
import torch
import transformers
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

import hf_common

hf = hf_common.require_hf_test_utils()

# A handful of common tests touching distinct conventions; the full mixin runs in test_modeling_nlip_common.py.
CLIP_COMMON_TESTS = (
    "test_save_load",
    "test_determinism",
    "test_model_outputs_equivalence",
    "test_batching_equivalence",
    "test_training",
    "test_get_image_features_output_0",
    "test_get_text_features_output_0",
    "test_eager_matches_sdpa_inference_13_fp32_pad_right",
    "test_sdpa_can_dispatch_composite_models",
)


def only_tests(*names):
    """Class decorator keeping only the listed `test_*` methods (unittest collects callables only)."""

    def keep(cls):
        missing = [name for name in names if not callable(getattr(cls, name, None))]
        if missing:
            raise ValueError(f"only_tests: {cls.__name__} has no test(s) {missing}")
        for name in dir(cls):
            if name.startswith("test_") and name not in names:
                setattr(cls, name, None)
        return cls

    return keep


class TinyCLIPModelTester:
    """Inputs and config for a 2-layer, 32-dim CLIP on 32-px images (patch 8), as transformers' CLIPModelTester."""

    def __init__(self, parent, batch_size=3, seq_length=7, vocab_size=99, image_size=32, patch_size=8):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.image_size, self.patch_size = image_size, patch_size
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4
        self.is_training = True

    def get_config(self):
        tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
        return CLIPConfig(
            text_config=CLIPTextConfig(
                vocab_size=self.vocab_size, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                **tower,
            ).to_dict(),
            vision_config=CLIPVisionConfig(image_size=self.image_size, patch_size=self.patch_size, **tower).to_dict(),
            projection_dim=16,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = hf.ids_tensor([self.batch_size, self.seq_length], self.vocab_size, rng=random)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -2:] = 0  # one right-padded row
        pixel_values = hf.floats_tensor([self.batch_size, 3, self.image_size, self.image_size], rng=random)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        return self.get_config(), {**inputs, "return_loss": True}


@only_tests(*CLIP_COMMON_TESTS)
class TinyCLIPModelTest(hf.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CLIPModel,)
    additional_model_inputs = ["pixel_values"]
    test_resize_embeddings = False
    _is_composite = True

    def setUp(self):
        self.model_tester = TinyCLIPModelTester(self)


class TinyCLIPConfigTest(unittest.TestCase):
    def test_config(self):
        self.model_tester = TinyCLIPModelTester(self)  # read by the custom-kwargs check
        common = ["projection_dim", "logit_scale_init_value"]
        hf.ConfigTester(self, config_class=CLIPConfig, has_text_modality=False, common_properties=common).run_common_tests()


class NoisyCLIPModel(CLIPModel):
    """Breaks determinism on purpose: eval-mode images get fresh noise on every call."""

    def forward(self, **kwargs):
        kwargs["pixel_values"] = kwargs["pixel_values"] + torch.randn_like(kwargs["pixel_values"])
        return super().forward(**kwargs)


def test_mixin_detects_a_defect():
    @only_tests("test_determinism")
    class NoisyCLIPTest(TinyCLIPModelTest):
        all_model_classes = (NoisyCLIPModel,)

    result = unittest.TestResult()
    NoisyCLIPTest("test_determinism").run(result)
    assert result.testsRun == 1 and not result.skipped
    assert len(result.failures) == 1, result.errors
    clean = unittest.TestResult()
    TinyCLIPModelTest("test_determinism").run(clean)
    assert clean.wasSuccessful() and clean.testsRun == 1


def test_tests_are_imported_under_a_unique_package_name():
    root = hf.tests_dir.parent
    assert hf.tests_dir == hf_common.hf_tests_cache_dir() / "root" / hf_common.PACKAGE_NAME
    assert hf.ModelTesterMixin.__module__ == f"{hf_common.PACKAGE_NAME}.test_modeling_common"
    assert sys.modules["transformers_sdist_tests"].__path__ == [str(hf.tests_dir)]
    assert str(root) not in sys.path and str(hf.tests_dir) not in sys.path
    assert hf.ProcessorTesterMixin.__module__ == f"{hf_common.PACKAGE_NAME}.test_processing_common"
    generation_is_stub = hf_common.STUB_MARKER in (hf.tests_dir / "generation" / "test_utils.py").read_text()
    assert (hf.GenerationTesterMixin is None) == generation_is_stub


def test_tensor_helpers():
    ids = hf.ids_tensor([4, 5], vocab_size=7)
    assert ids.shape == (4, 5) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 7
    mask = hf.random_attention_mask([6, 3])
    assert (mask[:, 0] == 1).all() and set(mask.unique().tolist()) <= {0, 1}
    assert hf.floats_tensor([2, 3], scale=0.5).max() < 0.5
    zeroed = hf._config_zero_init(TinyCLIPModelTester(None).get_config())
    assert zeroed.initializer_factor == 1e-10 and zeroed.vision_config.initializer_range == 1e-10


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache holding only a copy of the sdist archive; any download attempt fails the test."""
    monkeypatch.setenv("NLIP_HF_TESTS_CACHE", str(tmp_path))
    archive = next(hf.tests_dir.parent.parent.glob("transformers-*.tar.gz"))
    cache = hf_common.hf_tests_cache_dir()
    cache.mkdir(parents=True)
    shutil.copy(archive, cache / archive.name)

    def no_download(version, dest):
        raise AssertionError(f"unexpected download of transformers=={version}")

    monkeypatch.setattr(hf_common, "_download_sdist", no_download)
    return cache


def test_build_reuses_archive_and_writes_stubs_only_where_missing(fresh_cache):
    root = hf_common.ensure_hf_tests()
    package = root / hf_common.PACKAGE_NAME
    assert root == fresh_cache / "root"
    assert (package / "test_modeling_common.py").read_bytes() == (hf.tests_dir / "test_modeling_common.py").read_bytes()
    for rel in hf_common.STUBS:
        assert (root / rel).is_file(), rel
    assert hf_common.STUB_MARKER not in (package / "test_modeling_common.py").read_text()
    assert "config_common_kwargs" in (package / "utils" / "test_configuration_utils.py").read_text()
    assert not list(fresh_cache.glob(".build-*"))
    stamp = (package / "__init__.py").stat().st_mtime_ns
    assert hf_common.ensure_hf_tests() == root
    assert (package / "__init__.py").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_parallel_builds_agree(fresh_cache):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: hf_common.ensure_hf_tests(), range(4)))
    assert roots == [fresh_cache / "root"] * 4
    assert (roots[0] / hf_common.PACKAGE_NAME / "test_modeling_common.py").is_file()
    assert not list(fresh_cache.glob(".build-*"))


def test_stub_config_kwargs_cover_pretrained_config():
    from transformers_sdist_tests.utils.test_configuration_utils import config_common_kwargs

    base = transformers.PreTrainedConfig()
    fields = {field.name for field in dataclasses.fields(base)} - {"transformers_version", "is_encoder_decoder"}
    fields |= {"output_attentions"}  # a property over `_output_attentions`
    assert set(config_common_kwargs) == fields
    assert all(getattr(base, key) != value for key, value in config_common_kwargs.items())


def test_unsafe_archive_path_is_refused(tmp_path):
    archive = tmp_path / "transformers-0.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("transformers-0.0.0/tests/../../evil.py")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"boom"))
    with pytest.raises(hf_common.HFTestsUnavailable, match=r"unsafe path 'transformers-0.0.0/tests/\.\./\.\./evil.py'"):
        hf_common._extract_tests(archive, tmp_path / "out")
    assert not (tmp_path / "evil.py").exists()


def test_unreachable_pypi_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(hf_common.HFTestsUnavailable, match=r"`pip download transformers==5\.0\.0` .*failed: "):
        hf_common._download_sdist("5.0.0", tmp_path)


def test_unavailable_tests_skip_the_module_unless_required(monkeypatch):
    def unavailable():
        raise hf_common.HFTestsUnavailable("no PyPI")

    monkeypatch.setattr(hf_common, "load_hf_test_utils", unavailable)
    monkeypatch.delenv("NLIP_REQUIRE_HF_TESTS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="transformers' common tests unavailable .*: no PyPI"):
        hf_common.require_hf_test_utils()
    monkeypatch.setenv("NLIP_REQUIRE_HF_TESTS", "1")
    with pytest.raises(hf_common.HFTestsUnavailable, match="no PyPI"):
        hf_common.require_hf_test_utils()


def test_corrupt_archive_gives_a_clear_error(tmp_path):
    archive = tmp_path / "transformers-0.0.0.tar.gz"
    archive.write_bytes(b"not a tarball")
    with pytest.raises(hf_common.HFTestsUnavailable, match=r"transformers-0\.0\.0\.tar\.gz is not a readable .*delete it"):
        hf_common._extract_tests(archive, tmp_path / "out")
