"""The HTML page `nlip-audit` writes (`audit_report.html`): a Jinja template rendered by `nlip_cli.audit.render_report`.

One self-contained file that works offline and from `file://`: images and the loss plot are data URIs, the style and
the plain JavaScript (sorting, filtering, search, click-to-enlarge; no library, no CDN) are inlined. Every value from
the data goes through Jinja's autoescaping; the script reads them back from the DOM (`data-*` attributes and text),
never from inlined JSON, so a caption cannot inject code.
"""

REPORT_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>NLIP dataset audit: {{ dataset }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem; color: #1f2328; }
h1 { font-size: 1.5rem; margin-bottom: .25rem; }
h2 { font-size: 1.15rem; margin: 1.5rem 0 .5rem; }
.meta { color: #59636e; margin-bottom: 1.5rem; line-height: 1.6; }
.cards { display: flex; flex-wrap: wrap; gap: .75rem; margin-bottom: 1.5rem; }
.card { border: 1px solid #d1d9e0; border-radius: 6px; padding: .6rem .9rem; min-width: 9rem; }
.card .value { font-size: 1.3rem; font-weight: 600; }
.card .label { font-size: .8rem; color: #59636e; }
#loss-plot img { max-width: 100%; width: 42rem; border: 1px solid #d1d9e0; border-radius: 6px; }
#loss-plot figcaption, .note { color: #59636e; font-size: .85rem; }
#not-scored { border: 1px solid #d4a72c; background: #fff8c5; border-radius: 6px; padding: .5rem 1rem; }
.controls { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; margin: 1rem 0; padding: .6rem .8rem;
            background: #f6f8fa; border: 1px solid #d1d9e0; border-radius: 6px; position: sticky; top: 0; z-index: 2; }
.controls input[type=search] { width: 18rem; padding: .3rem .5rem; }
.controls input[type=number] { width: 5rem; }
#shown-count { color: #59636e; margin-left: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #d1d9e0; padding: .45rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
th.sortable { cursor: pointer; user-select: none; white-space: nowrap; }
th.sortable::after { content: " \\2195"; color: #8c959f; }
th[aria-sort=ascending]::after { content: " \\2191"; color: #1f2328; }
th[aria-sort=descending]::after { content: " \\2193"; color: #1f2328; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img.thumb { display: block; border-radius: 4px; cursor: zoom-in; max-width: {{ thumbnail_size }}px;
            max-height: {{ thumbnail_size }}px; min-width: 48px; image-rendering: pixelated; }
.bar { background: #eff2f5; border-radius: 3px; height: .45rem; width: 6rem; margin-top: .25rem; }
.bar span { display: block; height: 100%; border-radius: 3px; background: #cf222e; }
.suggested { color: #1a7f37; }
.quality { font-size: .8rem; margin-top: .2rem; white-space: nowrap; }
.quality.better { color: #1a7f37; }
.quality.worse { color: #a40e26; }
.concepts { color: #59636e; font-size: .9rem; }
.tag { border-radius: 1rem; padding: .05rem .5rem; font-size: .8rem; }
.tag.noisy { background: #ffebe9; color: #a40e26; }
.tag.clean { background: #dafbe1; color: #116329; }
#lightbox { position: fixed; inset: 0; background: rgba(0, 0, 0, .8); display: flex; align-items: center;
            justify-content: center; z-index: 10; cursor: zoom-out; }
#lightbox[hidden] { display: none; }
#lightbox figure { margin: 0; text-align: center; color: #fff; max-width: 90vw; }
#lightbox img { width: min(80vh, 80vw); height: min(80vh, 80vw); object-fit: contain; image-rendering: pixelated;
                background: #fff; border-radius: 6px; }
#lightbox figcaption { margin-top: .6rem; font-size: 1rem; }
</style>
</head>
<body>
<div id="lightbox" hidden><figure><img id="lightbox-image" alt="enlarged image"><figcaption id="lightbox-caption"></figcaption></figure></div>
<h1>Dataset audit: {{ dataset }}</h1>
<div class="meta">
Split <code>{{ split }}</code> &middot; {{ summary.pairs_scored }} pairs scored<br>
Scoring model (similarity, loss, noise probability): <code id="scorer">{{ summary.scorer.name_or_path }}</code>{% if summary.scorer.architecture %} ({{ summary.scorer.architecture }}){% endif %}<br>
Captioner (suggested captions): {% if summary.captioner %}<code id="captioner">{{ summary.captioner.name_or_path }}</code>{% if summary.captioner.architecture %} ({{ summary.captioner.architecture }}){% endif %}, {{ summary.captioner.num_beams }} beam{{ "s" if summary.captioner.num_beams != 1 else "" }}, at most {{ summary.captioner.max_new_tokens }} tokens{% else %}<span id="captioner">none</span> (the checkpoint has no captioning decoder; pass --captioner_name_or_path){% endif %}
</div>
<div class="cards">
{% for label, value in cards %}<div class="card"><div class="value">{{ value }}</div><div class="label">{{ label }}</div></div>
{% endfor %}</div>
{% if skipped %}<section id="not-scored">
<h2>Pairs not scored</h2>
<p>{{ skipped.total }} pair{{ "s" if skipped.total != 1 else "" }} could not be read when the data was loaded and {{ "are" if skipped.total != 1 else "is" }} not in this audit:
{% for reason, count in skipped.reasons %}{{ reason }}: {{ count }}{{ "; " if not loop.last else "." }}{% endfor %}</p>
{% if skipped.files %}<p>Broken files:</p>
<ul class="broken-files">
{% for file in skipped.files %}<li><code>{{ file }}</code></li>
{% endfor %}</ul>{% endif %}
</section>{% endif %}
{% if plot %}<figure id="loss-plot">
<img src="{{ plot }}" alt="Histogram of the per-pair losses with the two fitted Gaussian components">
<figcaption>Per-pair contrastive loss against {{ summary.num_negatives }} fixed random negatives, with the clean and
noisy components of the fitted 2-component Gaussian mixture{% if summary.gmm_loss_threshold is not none %} and the
loss ({{ "%.3f"|format(summary.gmm_loss_threshold) }}) where the noise probability crosses 0.5{% endif %}{% if has_truth %};
the ground truth in two colours{% endif %}.{% if summary.gmm_fallback_reason %} No mixture was fitted: {{ summary.gmm_fallback_reason }}.{% endif %}</figcaption>
</figure>{% endif %}
<h2>{% if all_shown %}All {{ rows|length }} pairs{% else %}The {{ rows|length }} most suspicious of {{ summary.pairs_scored }} pairs{% endif %}</h2>
<div class="controls">
<label>Search <input type="search" id="search" placeholder="caption, concept, file..."></label>
<label>Noise probability &ge; <input type="number" id="min-noise" min="0" max="1" step="0.05" value="0"></label>
{% if has_truth %}<label>Ground truth <select id="truth-filter"><option value="">all</option><option value="noisy">noisy</option><option value="clean">clean</option></select></label>{% endif %}
{% if has_suggestions %}<label><input type="checkbox" id="only-suggested"> only with a suggested caption</label>{% endif %}
<span id="shown-count">{{ rows|length }} of {{ rows|length }} rows</span>
</div>
<table id="pairs">
<thead><tr>
<th class="sortable" data-key="rank" data-type="num" aria-sort="ascending">#</th>
<th>Image</th>
<th class="sortable" data-key="caption" data-type="text">Caption</th>
<th class="sortable" data-key="noise" data-type="num">Noise prob.</th>
<th class="sortable" data-key="sim" data-type="num">Similarity</th>
{% if has_concepts %}<th>Concepts</th>{% endif %}
<th class="sortable" data-key="gain" data-type="num" title="sorted by the similarity gain of the suggestion">Suggested caption</th>
{% if has_truth %}<th class="sortable" data-key="truth" data-type="text">Ground truth</th>{% endif %}
<th class="sortable" data-key="name" data-type="text">Pair</th>
</tr></thead>
<tbody>
{% for row in rows %}<tr data-rank="{{ row.rank }}" data-noise="{{ row.noise_prob }}" data-loss="{{ row.loss }}" data-sim="{{ row.similarity }}" data-gain="{{ row.similarity_gain if row.similarity_gain is not none else '' }}" data-caption="{{ row.caption }}" data-name="{{ row.name }}" data-suggested="{{ 1 if row.suggested_caption else 0 }}"{% if has_truth %} data-truth="{{ 'noisy' if row.is_noisy else 'clean' }}"{% endif %}>
<td class="num">{{ row.rank }}</td>
<td>{% if row.image %}<img class="thumb" src="{{ row.image }}" alt="pair {{ row.index }}" title="click to enlarge">{% else %}(undecodable){% endif %}</td>
<td class="caption">{{ row.caption }}</td>
<td class="num">{{ "%.3f"|format(row.noise_prob) }}<div class="bar"><span style="width: {{ (100 * row.noise_prob)|round(1) }}%"></span></div></td>
<td class="num">{{ "%.3f"|format(row.similarity) }}</td>
{% if has_concepts %}<td class="concepts">{{ (row.concepts or [])|join(", ") }}</td>{% endif %}
<td class="suggested">{% if row.suggested_caption %}{{ row.suggested_caption }}{% if row.suggested_similarity is not none %}<div class="quality {{ 'better' if row.similarity_gain > 0 else 'worse' }}" title="similarity of the suggested caption to the image under the scoring model, vs. the original caption's">similarity {{ "%.3f"|format(row.suggested_similarity) }} vs. {{ "%.3f"|format(row.similarity) }} ({{ "%+.3f"|format(row.similarity_gain) }})</div>{% endif %}{% endif %}</td>
{% if has_truth %}<td><span class="tag {{ 'noisy' if row.is_noisy else 'clean' }}">{{ 'noisy' if row.is_noisy else 'clean' }}</span></td>{% endif %}
<td class="name">{{ row.name }}</td>
</tr>
{% endfor %}</tbody>
</table>
<p class="note">{% if all_shown %}All {{ rows|length }} pairs are shown{% else %}Showing the {{ rows|length }} most suspicious of {{ summary.pairs_scored }} pairs; all are in audit.parquet / audit.csv{% endif %}.
Noise probability: posterior of the high-loss component of a 2-component Gaussian mixture fit to each pair's contrastive
loss against {{ summary.num_negatives }} fixed random negatives. Similarity: cosine similarity of the image and the caption
under the scoring model; a suggested caption's similarity is measured the same way.</p>
<script>
{% raw %}
(function () {
  "use strict";
  var table = document.getElementById("pairs");
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var search = document.getElementById("search");
  var minNoise = document.getElementById("min-noise");
  var truth = document.getElementById("truth-filter");
  var onlySuggested = document.getElementById("only-suggested");
  var count = document.getElementById("shown-count");

  rows.forEach(function (row) {
    row.searchText = row.textContent.toLowerCase();
  });

  function applyFilters() {
    var query = search.value.trim().toLowerCase();
    var threshold = parseFloat(minNoise.value);
    if (isNaN(threshold)) { threshold = 0; }
    var wanted = truth ? truth.value : "";
    var shown = 0;
    rows.forEach(function (row) {
      var visible = parseFloat(row.dataset.noise) >= threshold &&
        (!query || row.searchText.indexOf(query) !== -1) &&
        (!wanted || row.dataset.truth === wanted) &&
        (!onlySuggested || !onlySuggested.checked || row.dataset.suggested === "1");
      row.hidden = !visible;
      if (visible) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " rows";
  }

  function sortBy(header) {
    var key = header.dataset.key;
    var numeric = header.dataset.type === "num";
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.querySelectorAll("th"), function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var sign = ascending ? 1 : -1;
    rows.sort(function (a, b) {
      var x = a.dataset[key], y = b.dataset[key];
      if (numeric) {
        x = x === "" ? NaN : parseFloat(x);
        y = y === "" ? NaN : parseFloat(y);
        if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }  // missing values last either way
        return sign * (x - y) || (a.dataset.rank - b.dataset.rank);
      }
      return sign * x.localeCompare(y) || (a.dataset.rank - b.dataset.rank);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }

  Array.prototype.forEach.call(table.tHead.querySelectorAll("th.sortable"), function (header) {
    header.addEventListener("click", function () { sortBy(header); });
  });
  [search, minNoise, truth, onlySuggested].forEach(function (control) {
    if (control) {
      control.addEventListener("input", applyFilters);
      control.addEventListener("change", applyFilters);
    }
  });

  var lightbox = document.getElementById("lightbox");
  var enlarged = document.getElementById("lightbox-image");
  var caption = document.getElementById("lightbox-caption");
  body.addEventListener("click", function (event) {
    var image = event.target.closest("img.thumb");
    if (!image) { return; }
    var row = image.closest("tr");
    enlarged.src = image.src;
    caption.textContent = "#" + row.dataset.rank + " " + row.dataset.name + ": " + row.dataset.caption;
    lightbox.hidden = false;
  });
  lightbox.addEventListener("click", function () { lightbox.hidden = true; });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape") { lightbox.hidden = true; }
  });
  applyFilters();
})();
{% endraw %}
</script>
</body>
</html>
"""
