"""What `nlip-audit` writes, checked without a browser (tests/nlip_cli/test_audit_report_browser.py drives the page): no `nan` /
`None` for pairs without a suggested caption, CSV cells that cannot run as spreadsheet formulas, a Parquet table that
`datasets` reads back with its images, relative image paths, the models named, the loss plot embedded, the load-time
skip counts shown when present, and no misleading "top N" card when every pair is shown."""

import csv
import json
from html.parser import HTMLParser

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from modeling_nlip import NLIPForCaptioning, NLIPModel
from nlip_cli import audit
from nlip_testing import tiny_decoder_config, tiny_nlip_config, tiny_processor

FORMULA_CAPTIONS = ["=HYPERLINK(\"http://x\")", "+1+2", "-3 dogs", "@SUM(A1)", "\tcat", "\rcar"]
CAPTIONS = [*FORMULA_CAPTIONS, "a red car", "a small dog", "a cat on a mat", "two birds"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("audit_models")
    NLIPModel(tiny_nlip_config()).save_pretrained(root / "dual")
    tiny_processor().save_pretrained(root / "dual")
    NLIPForCaptioning(tiny_nlip_config(decoder_config=tiny_decoder_config())).save_pretrained(root / "captioner")
    tiny_processor().save_pretrained(root / "captioner")
    return str(root / "dual"), str(root / "captioner")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_pairs")
    rng = np.random.default_rng(1)
    with open(root / "metadata.jsonl", "w") as metadata:
        for i, caption in enumerate(CAPTIONS):
            Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
            metadata.write(json.dumps({"file_name": f"{i:02d}.png", "text": caption}) + "\n")
    return str(root)


def _run(models, image_folder, output_dir, *extra):
    dual, captioner = models
    return audit.main(["--model_name_or_path", dual, "--train_dir", image_folder, "--output_dir", str(output_dir),
                       "--captioner_name_or_path", captioner, "--suggest_threshold", "0", "--max_suggestions", "3",
                       "--max_new_tokens", "4", "--num_beams", "1", "--num_concepts", "2", "--disable_tqdm", *extra])


class _Text(HTMLParser):
    """Everything of a page a reader sees or a script reads, except image data and the page's own script and style:
    text and attribute values."""

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.sections: list[str] = []
        self._code = False

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._code = False

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._code = True
        for name, value in attrs:
            if name == "id" and tag == "section":
                self.sections.append(value)
            if name != "src" and value:
                self.parts.append(value)

    def handle_data(self, data):
        if not self._code:
            self.parts.append(data)


def _visible_text(html: str) -> _Text:
    parser = _Text()
    parser.feed(html)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def audited(models, image_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("audit_out")
    return _run(models, image_folder, output), output


def test_rows_without_a_suggested_caption_show_nothing(audited):
    result, _ = audited
    html = open(result["paths"]["html"], encoding="utf-8").read()
    text = " ".join(_visible_text(html).parts)
    assert result["summary"]["suggested_captions"] == 3 and result["summary"]["pairs_scored"] == len(CAPTIONS)
    for word in ("nan", "NaN", "None", "undefined"):
        assert word not in text.split() and f">{word}<" not in html, word
    assert html.count('data-suggested="1"') == 3 and html.count('data-suggested="0"') == len(CAPTIONS) - 3
    assert html.count('class="quality ') == 3  # the similarity comparison, only where there is a suggestion


def test_csv_cells_cannot_run_as_formulas(audited):
    result, _ = audited
    with open(result["paths"]["csv"], encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    captions = {row["caption"] for row in rows}
    for caption in FORMULA_CAPTIONS:
        assert "'" + caption in captions, caption
    assert "a red car" in captions  # ordinary text untouched
    assert all(not row["caption"] or row["caption"][0] not in "=+-@\t\r" for row in rows)
    assert all(float(row["noise_prob"]) >= 0 for row in rows)  # numbers stay numbers
    assert all(row["suggested_caption"] == "" or not row["suggested_caption"].startswith("nan") for row in rows)


def test_parquet_reads_back_with_datasets_and_images(audited):
    result, _ = audited
    loaded = datasets.load_dataset("parquet", data_files=result["paths"]["parquet"], split="train")
    assert isinstance(loaded.features["image"], datasets.Image) and len(loaded) == len(CAPTIONS)
    assert {"rank", "caption", "noise_prob", "similarity", "suggested_caption", "suggested_similarity",
            "image_file"} <= set(loaded.column_names)
    first = loaded[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (30, 36)
    assert loaded["rank"] == list(range(1, len(CAPTIONS) + 1))
    assert sum(caption is not None for caption in loaded["suggested_caption"]) == 3
    assert all(path == f"{int(path[:2]):02d}.png" for path in loaded["image_file"])  # relative to --train_dir
    # the image of each row is the one the row names
    rows = {int(name[:2]): image for name, image in zip(loaded["image_file"], loaded["image"])}
    assert all(image.size == (30, 36) for image in rows.values())


def test_report_names_models_embeds_plot_and_uses_relative_paths(audited, models):
    result, output = audited
    html = open(result["paths"]["html"], encoding="utf-8").read()
    dual, captioner = models
    assert f'<code id="scorer">{dual}</code> (NLIPModel)' in html
    assert f'<code id="captioner">{captioner}</code> (NLIPForCaptioning)' in html
    assert 'id="loss-plot"' in html and (output / "audit_loss_distribution.png").stat().st_size > 5000
    assert html.count("<script>") == 1 and "http://" not in html.replace('HYPERLINK(&#34;http://x', "")
    assert "https://" not in html  # nothing is fetched from a CDN
    assert 'class="name">00.png<' in html or '>00.png</td>' in html
    assert result["summary"]["captioner"]["name_or_path"] == captioner


def test_top_n_card_only_when_rows_are_left_out(models, image_folder, tmp_path):
    everything = _run(models, image_folder, tmp_path / "all", "--noise_ratio", "0.4")
    html = open(everything["paths"]["html"], encoding="utf-8").read()
    assert "roc_auc" in everything["summary"] and "truly noisy among the top" not in html
    assert not any(key.startswith("noisy_fraction_in_top_") for key in everything["summary"])
    some = _run(models, image_folder, tmp_path / "some", "--noise_ratio", "0.4", "--report_rows", "4")
    html = open(some["paths"]["html"], encoding="utf-8").read()
    assert "truly noisy among the top 4" in html and "noisy_fraction_in_top_4" in some["summary"]
    assert html.count("<tr data-rank=") == 4


def test_skipped_pairs_are_listed_when_present(models, image_folder, tmp_path, monkeypatch):
    plain = _run(models, image_folder, tmp_path / "plain")
    assert "not-scored" not in _visible_text(open(plain["paths"]["html"], encoding="utf-8").read()).sections

    class Report:  # what trainers.data.pairs.SkipReport.to_dict gives the summary
        def to_dict(self):
            return {"undecodable image": 2, "empty caption": 1, "missing image": 0,
                    "files": ["broken/a.png", "broken/<b>.png"]}

    load = audit.load_pairs

    def with_skips(*args, **kwargs):
        data = load(*args, **kwargs)
        data.skip_reports = {"train": Report()}
        return data

    monkeypatch.setattr(audit, "load_pairs", with_skips)
    skipped = _run(models, image_folder, tmp_path / "skipped")
    html = open(skipped["paths"]["html"], encoding="utf-8").read()
    parsed = _visible_text(html)
    assert "not-scored" in parsed.sections
    text = " ".join(" ".join(parsed.parts).split())
    assert "3 pairs could not be read" in text and "undecodable image: 2" in text and "empty caption: 1" in text
    assert "missing image" not in text  # zero counts are not listed
    assert "<code>broken/a.png</code>" in html and "broken/&lt;b&gt;.png" in html
    assert json.load(open(skipped["paths"]["summary"]))["skipped_pairs"]["files"] == ["broken/a.png", "broken/<b>.png"]


def test_neighbour_agreement_column_and_its_roc_auc(models, image_folder, tmp_path):
    """`--neighbours k`: each pair's mean caption cosine with its k nearest images (the scorer's embeddings), a column
    of the tables, and its ROC-AUC against the injected noise (low agreement: suspicious) in the summary and report."""
    result = _run(models, image_folder, tmp_path, "--neighbours", "3", "--noise_ratio", "0.5")
    summary = result["summary"]
    table = pd.read_csv(result["paths"]["csv"])
    assert table["neighbour_agreement"].between(-1, 1).all() and table["neighbour_agreement"].nunique() > 1
    truth = table["is_noisy"].astype(bool)
    assert summary["neighbour_roc_auc"] == pytest.approx(roc_auc_score(truth, -table["neighbour_agreement"]))
    assert "neighbour-agreement ROC-AUC" in open(result["paths"]["html"], encoding="utf-8").read()
    assert "neighbour_agreement" not in pd.read_csv(_run(models, image_folder, tmp_path / "off")["paths"]["csv"])
    with pytest.raises(ValueError, match=r"--neighbours 10 needs more scored pairs than that; the train split has 10"):
        _run(models, image_folder, tmp_path / "big", "--neighbours", "10")
    with pytest.raises(ValueError, match=r"--neighbours must be >= 0, got -1"):
        _run(models, image_folder, tmp_path / "negative", "--neighbours", "-1")


def test_csv_safe():
    assert [audit.csv_safe(v) for v in ("=1", "+1", "-1", "@a", "\tx", "\rx", "ok", "", 3.5, None)] == \
        ["'=1", "'+1", "'-1", "'@a", "'\tx", "'\rx", "ok", "", 3.5, None]


def test_every_command_has_version(capsys):
    from nlip_cli import caption, convert_clip_to_nlip, evaluate, push, train
    from nlip_cli.cli import nlip_version

    for module in (train, evaluate, caption, audit, push, convert_clip_to_nlip):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--version"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"nlip {nlip_version()} (transformers ") and "torch" in out, (module, out)
