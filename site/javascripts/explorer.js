// The patch explorer: cosine-similarity, PCA, k-means and token-norm maps of the gallery images,
// computed in the browser from the compact assets `patchatlas render` writes (generator/explorer.py).
// Each model × layer is one small binary file of int8 PCA coordinates (and uint16 pre-norm norms),
// fetched when it is first shown. Plain JS and 2-D canvases: no server, no WebGL needed.
(function () {
  "use strict";

  var MODES = [["similarity", "Cosine similarity"], ["pca", "PCA colours"], ["kmeans", "k-means clusters"],
               ["norms", "Pre-norm token norms"]];
  var K_VALUES = [2, 3, 4, 5, 6, 8, 10, 12, 16];
  var MAX_MODELS = 4;
  var KMEANS_ITERATIONS = 25;
  var indexes = {}, layers = {}, instances = [], uid = 0;

  function fetchJson(url) {
    if (!indexes[url]) {
      indexes[url] = fetch(url).then(function (r) {
        if (!r.ok) throw new Error(url + ": HTTP " + r.status);
        return r.json();
      });
    }
    return indexes[url];
  }

  // One model × layer decoded: similarity coordinates y = [z + offset, residual] as unit rows
  // (the cosine of two patches is then one dot product), z itself (PCA, k-means) and the norms.
  function decodeLayer(buffer, entry, n) {
    var r = entry.components, stride = r + 1;
    var q = new Int8Array(buffer, 0, n * r);
    var z = new Float32Array(n * r), unit = new Float32Array(n * stride);
    for (var i = 0; i < n; i++) {
      var sum = entry.residual * entry.residual;
      for (var k = 0; k < r; k++) {
        var value = q[i * r + k] * entry.scale[k];
        z[i * r + k] = value;
        var y = value + entry.offset[k];
        unit[i * stride + k] = y;
        sum += y * y;
      }
      unit[i * stride + r] = entry.residual;
      var inv = sum > 0 ? 1 / Math.sqrt(sum) : 0;
      for (k = 0; k < stride; k++) unit[i * stride + k] *= inv;
    }
    var norms = null;
    if (entry.norms_offset !== null) {
      var codes = new Uint16Array(buffer, entry.norms_offset, n);
      norms = new Float32Array(n);
      for (i = 0; i < n; i++) norms[i] = entry.norm_top * codes[i] / 65535;
    }
    return {z: z, unit: unit, stride: stride, r: r, norms: norms, kmeans: {}};
  }

  function fetchLayer(indexUrl, model, entry, n) {
    var url = new URL(entry.file, indexUrl).href;
    if (!layers[url]) {
      layers[url] = fetch(url).then(function (r) {
        if (!r.ok) throw new Error(url + ": HTTP " + r.status);
        return r.arrayBuffer();
      }).then(function (buffer) {
        if (buffer.byteLength !== entry.bytes) throw new Error(url + ": " + buffer.byteLength + " bytes, expected " + entry.bytes);
        return decodeLayer(buffer, entry, n);
      });
    }
    return layers[url];
  }

  function mulberry32(seed) {
    return function () {
      seed |= 0; seed = seed + 0x6D2B79F5 | 0;
      var t = Math.imul(seed ^ seed >>> 15, 1 | seed);
      t = t + Math.imul(t ^ t >>> 7, 61 | t) ^ t;
      return ((t ^ t >>> 14) >>> 0) / 4294967296;
    };
  }

  // Lloyd's k-means on the PCA coordinates, k-means++ seeding from a fixed seed: the same map
  // on every visit. Clusters are numbered by size (largest first) so colours are stable.
  function kmeans(z, n, r, k) {
    var random = mulberry32(k), centres = new Float32Array(k * r), best = new Float64Array(n), labels = new Int32Array(n);
    var first = Math.floor(random() * n), i, j, c, d, total;
    for (j = 0; j < r; j++) centres[j] = z[first * r + j];
    for (i = 0; i < n; i++) best[i] = Infinity;
    for (c = 1; c < k; c++) {
      total = 0;
      for (i = 0; i < n; i++) {
        d = 0;
        for (j = 0; j < r; j++) { var t = z[i * r + j] - centres[(c - 1) * r + j]; d += t * t; }
        if (d < best[i]) best[i] = d;
        total += best[i];
      }
      var target = random() * total, pick = n - 1;
      for (i = 0; i < n; i++) { target -= best[i]; if (target <= 0) { pick = i; break; } }
      for (j = 0; j < r; j++) centres[c * r + j] = z[pick * r + j];
    }
    var sums = new Float64Array(k * r), counts = new Int32Array(k);
    for (var it = 0; it < KMEANS_ITERATIONS; it++) {
      var changed = false;
      for (i = 0; i < n; i++) {
        var bestC = 0, bestD = Infinity;
        for (c = 0; c < k; c++) {
          d = 0;
          for (j = 0; j < r; j++) { var u = z[i * r + j] - centres[c * r + j]; d += u * u; }
          if (d < bestD) { bestD = d; bestC = c; }
        }
        if (labels[i] !== bestC || it === 0) { changed = true; labels[i] = bestC; }
      }
      if (!changed) break;
      sums.fill(0); counts.fill(0);
      for (i = 0; i < n; i++) {
        counts[labels[i]]++;
        for (j = 0; j < r; j++) sums[labels[i] * r + j] += z[i * r + j];
      }
      for (c = 0; c < k; c++) if (counts[c]) for (j = 0; j < r; j++) centres[c * r + j] = sums[c * r + j] / counts[c];
    }
    var order = Array.from({length: k}, function (_, c) { return c; });
    order.sort(function (a, b) { return counts[b] - counts[a] || a - b; });
    var rank = new Int32Array(k);
    order.forEach(function (c, position) { rank[c] = position; });
    for (i = 0; i < n; i++) labels[i] = rank[labels[i]];
    return labels;
  }

  function element(tag, attrs, children) {
    var el = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") el.textContent = attrs[key];
      else if (key === "className") el.className = attrs[key];
      else el.setAttribute(key, attrs[key]);
    });
    (children || []).forEach(function (child) { if (child) el.appendChild(child); });
    return el;
  }

  function loadLine(index, config) {
    return "load_dataset(" + JSON.stringify(index.repo_id) + ", " + JSON.stringify(config) + ', split="train")';
  }

  function Explorer(root, index, indexUrl) {
    this.root = root;
    this.index = index;
    this.indexUrl = indexUrl;
    this.id = "pa-explorer-" + (++uid);
    this.compact = root.hasAttribute("data-compact");
    var fixed = (root.getAttribute("data-models") || "").split(",").filter(Boolean);
    var byName = {};
    index.models.forEach(function (m) { byName[m.name] = m; });
    this.byName = byName;
    this.selected = (fixed.length ? fixed : index.default_models).filter(function (m) { return byName[m]; });
    this.fixed = fixed.length > 0;
    this.n = index.images.length;
    this.mode = "similarity";
    this.k = 4;
    this.opacity = 0.8;
    var first = byName[this.selected[0]];
    // The query: an image and a position in it as fractions, so every model's grid finds its own
    // patch under the same spot (grids differ between patch sizes).
    this.query = {image: 0, y: 0.5 / first.grid[0], x: 0.5 / first.grid[1]};
    this.pinned = Object.assign({}, this.query);
    this.timings = [];
    this.data = {};
    this.allLayers = [];
    this.layer = null;
    this.build();
  }

  Explorer.prototype.layersOf = function (names) {
    var seen = {};
    var self = this;
    names.forEach(function (m) { self.byName[m].layers.forEach(function (l) { seen[l.layer] = true; }); });
    return Object.keys(seen).map(Number).sort(function (a, b) { return a - b; });
  };

  Explorer.prototype.entryFor = function (model) {
    var target = this.layer, options = this.byName[model].layers;
    return options.reduce(function (best, l) {
      return Math.abs(l.layer - target) < Math.abs(best.layer - target) ? l : best;
    }, options[options.length - 1]);
  };

  Explorer.prototype.build = function () {
    var self = this, index = this.index, id = this.id;
    var controls = element("div", {className: "pa-controls"});
    if (!this.fixed) {
      var boxes = element("fieldset", {className: "pa-models"}, [element("legend", {text: "Models (1–" + MAX_MODELS + ")"})]);
      index.models.forEach(function (m, i) {
        var box = element("input", {type: "checkbox", id: id + "-model-" + i, value: m.name});
        box.checked = self.selected.indexOf(m.name) >= 0;
        box.addEventListener("change", function () { self.setModels(); });
        boxes.appendChild(element("span", {className: "pa-choice"}, [box, element("label", {"for": box.id, text: m.name})]));
      });
      controls.appendChild(boxes);
      this.boxes = boxes;
    }
    var slider = element("input", {type: "range", id: id + "-layer", min: "0", step: "1"});
    this.layerLabel = element("label", {"for": slider.id});
    slider.addEventListener("input", function () { self.layer = self.allLayers[+slider.value]; self.refresh(); });
    this.slider = slider;
    controls.appendChild(element("span", {className: "pa-control"}, [this.layerLabel, slider]));

    var mode = element("select", {id: id + "-mode"});
    MODES.forEach(function (m) { mode.appendChild(element("option", {value: m[0], text: m[1]})); });
    mode.addEventListener("change", function () { self.mode = mode.value; self.kSelect.disabled = self.mode !== "kmeans"; self.refresh(); });
    controls.appendChild(element("span", {className: "pa-control"}, [element("label", {"for": mode.id, text: "Show"}), mode]));
    this.modeSelect = mode;

    var kSelect = element("select", {id: id + "-k"});
    K_VALUES.forEach(function (k) { kSelect.appendChild(element("option", {value: String(k), text: String(k)})); });
    kSelect.value = String(this.k);
    kSelect.disabled = true;
    kSelect.addEventListener("change", function () { self.k = +kSelect.value; self.refresh(); });
    controls.appendChild(element("span", {className: "pa-control"}, [element("label", {"for": kSelect.id, text: "k"}), kSelect]));
    this.kSelect = kSelect;

    var opacity = element("input", {type: "range", id: id + "-opacity", min: "0", max: "100", step: "5", value: String(this.opacity * 100)});
    opacity.addEventListener("input", function () { self.opacity = opacity.value / 100; self.root.style.setProperty("--pa-opacity", self.opacity); });
    controls.appendChild(element("span", {className: "pa-control"}, [element("label", {"for": opacity.id, text: "Overlay opacity"}), opacity]));
    this.root.style.setProperty("--pa-opacity", this.opacity);

    this.status = element("p", {className: "pa-status", "aria-live": "polite"});
    this.panels = element("div", {className: "pa-panels"});
    this.root.textContent = "";
    this.root.appendChild(controls);
    this.root.appendChild(this.status);
    this.root.appendChild(this.panels);
    this.setModels(true);
  };

  Explorer.prototype.setModels = function (initial) {
    var self = this;
    if (this.boxes && !initial) {
      this.selected = Array.from(this.boxes.querySelectorAll("input:checked"), function (b) { return b.value; });
    }
    if (this.boxes) {
      var full = this.selected.length >= MAX_MODELS, last = this.selected.length <= 1;
      this.boxes.querySelectorAll("input").forEach(function (b) {
        b.disabled = (full && !b.checked) || (last && b.checked);
      });
    }
    var previous = this.layer;
    this.allLayers = this.layersOf(this.selected);
    this.slider.max = String(this.allLayers.length - 1);
    var position = this.allLayers.indexOf(previous);
    if (position < 0) position = this.allLayers.length - 1;  // the deepest layer first
    this.slider.value = String(position);
    this.layer = this.allLayers[position];
    this.panels.style.setProperty("--pa-columns", this.selected.length);
    this.panels.textContent = "";
    this.panelOf = {};
    this.selected.forEach(function (model) { self.panelOf[model] = self.buildPanel(model); });
    this.refresh();
  };

  Explorer.prototype.buildPanel = function (model) {
    var self = this, info = this.byName[model];
    var heading = element("h3", {className: "pa-panel-title"});
    var caption = element("p", {className: "pa-caption"});
    var code = element("code");
    var link = element("a");
    var tiles = element("div", {className: "pa-tiles"});
    var panel = {model: model, heading: heading, caption: caption, code: code, link: link, canvases: [], markers: []};
    this.index.images.forEach(function (img, i) {
      var picture = element("img", {src: new URL(img.src, self.indexUrl).href, alt: img.id, draggable: "false"});
      var canvas = element("canvas", {width: String(info.grid[1]), height: String(info.grid[0]), "aria-hidden": "true"});
      var marker = element("span", {className: "pa-marker", "aria-hidden": "true"});
      var tile = element("div", {className: "pa-tile", tabindex: "0", role: "button", "data-image": String(i),
                                 "aria-label": model + ", image " + img.id + ": hover or click a patch; arrow keys move the query patch, Enter selects it"},
                         [picture, canvas, marker]);
      tile.style.setProperty("--pa-aspect", info.grid[1] + " / " + info.grid[0]);
      self.bindTile(tile, i);
      tiles.appendChild(tile);
      panel.canvases.push(canvas);
      panel.markers.push(marker);
    });
    // The PCA view adds a 2-D map of every gallery patch (first two components); hovering a
    // point makes its patch the query, so the marker shows where it sits in its image.
    var scatter = element("canvas", {className: "pa-scatter", width: "240", height: "240", role: "img",
                                     "aria-label": model + ": every gallery patch on the first two principal components; hover a point to query its patch"});
    scatter.hidden = true;
    scatter.addEventListener("mousemove", function (event) { self.hoverScatter(model, event); });
    scatter.addEventListener("click", function (event) { self.hoverScatter(model, event, true); });
    panel.scatter = scatter;
    var section = element("section", {className: "pa-panel", "data-model": model},
                          [heading, tiles, caption, scatter, element("p", {className: "pa-load"}, [code, document.createTextNode(" "), link])]);
    this.panels.appendChild(section);
    return panel;
  };

  Explorer.prototype.bindTile = function (tile, image) {
    var self = this;
    function at(event) {
      var box = tile.getBoundingClientRect();
      return {image: image, y: Math.min(Math.max((event.clientY - box.top) / box.height, 0), 0.9999),
              x: Math.min(Math.max((event.clientX - box.left) / box.width, 0), 0.9999)};
    }
    var pending = null;
    tile.addEventListener("mousemove", function (event) {
      var spot = at(event);
      if (pending === null) {
        pending = requestAnimationFrame(function () { pending = null; self.show(spot, false, event.timeStamp); });
      }
    });
    tile.addEventListener("mouseleave", function () { self.show(self.pinned, false); });
    tile.addEventListener("click", function (event) { self.show(at(event), true, event.timeStamp); });
    tile.addEventListener("keydown", function (event) {
      var grid = self.byName[self.selected[0]].grid, q = self.query.image === image ? self.query : {image: image, y: 0.5 / grid[0], x: 0.5 / grid[1]};
      var step = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1]}[event.key];
      if (step) {
        event.preventDefault();
        var row = Math.min(Math.max(Math.floor(q.y * grid[0]) + step[0], 0), grid[0] - 1);
        var col = Math.min(Math.max(Math.floor(q.x * grid[1]) + step[1], 0), grid[1] - 1);
        self.show({image: image, y: (row + 0.5) / grid[0], x: (col + 0.5) / grid[1]}, false, event.timeStamp);
      } else if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        self.show(q, true, event.timeStamp);
      }
    });
    tile.addEventListener("focus", function () { if (self.query.image !== image) self.drawMarkers(); });
  };

  Explorer.prototype.cellOf = function (model, spot) {
    var grid = this.byName[model].grid;
    var row = Math.floor(spot.y * grid[0]), col = Math.floor(spot.x * grid[1]);
    return {image: spot.image, row: row, col: col, index: (spot.image * grid[0] + row) * grid[1] + col};
  };

  Explorer.prototype.show = function (spot, pin, since) {
    var start = performance.now();
    this.query = Object.assign({}, spot);
    if (pin) this.pinned = Object.assign({}, spot);
    this.draw();
    var end = performance.now();
    if (pin) {
      var timing = {update_ms: end - start, from_event_ms: since ? end - since : null};
      this.timings.push(timing);
      // The time to the next frame, once the canvases have been composited.
      requestAnimationFrame(function () { setTimeout(function () { timing.frame_ms = performance.now() - (since || start); }, 0); });
    }
  };

  Explorer.prototype.refresh = function () {
    var self = this, index = this.index;
    this.layerLabel.textContent = "Layer " + this.layer;
    this.status.textContent = "Loading…";
    var jobs = this.selected.map(function (model) {
      var entry = self.entryFor(model);
      return fetchLayer(self.indexUrl, model, entry, self.n * self.byName[model].grid[0] * self.byName[model].grid[1])
        .then(function (data) { self.data[model] = {entry: entry, values: data}; });
    });
    this.ready = Promise.all(jobs).then(function () {
      self.status.textContent = "";
      self.draw();
    }, function (err) {
      self.status.textContent = "Could not load the explorer's data: " + err.message;
      throw err;
    });
    this.selected.forEach(function (model) {
      var entry = self.entryFor(model), panel = self.panelOf[model];
      var config = self.mode === "norms" && entry.norm_config ? entry.norm_config : entry.config;
      panel.heading.textContent = model + " · layer " + entry.layer;
      panel.code.textContent = loadLine(index, config);
      panel.link.textContent = index.published ? "open in the dataset viewer" : "all configs (Downloads)";
      panel.link.href = index.published ? (self.mode === "norms" && entry.norm_config ? entry.url.replace(entry.config, entry.norm_config) : entry.url)
                                        : self.root.getAttribute("data-downloads");
    });
  };

  Explorer.prototype.similarity = function (model) {
    var d = this.data[model];
    if (!d || d.entry.layer !== this.entryFor(model).layer) return null;
    var v = d.values, cell = this.cellOf(model, this.query), n = v.unit.length / v.stride, s = v.stride;
    var out = new Float32Array(n), base = cell.index * s;
    for (var i = 0; i < n; i++) {
      var dot = 0, o = i * s;
      for (var k = 0; k < s; k++) dot += v.unit[o + k] * v.unit[base + k];
      out[i] = dot;
    }
    return {cell: cell, values: out};
  };

  Explorer.prototype.draw = function () {
    var self = this;
    this.selected.forEach(function (model) { self.drawPanel(model); });
    this.drawMarkers();
  };

  Explorer.prototype.drawMarkers = function () {
    var self = this;
    this.selected.forEach(function (model) {
      var panel = self.panelOf[model], grid = self.byName[model].grid, cell = self.cellOf(model, self.query);
      panel.markers.forEach(function (marker, i) {
        marker.hidden = i !== cell.image;
        marker.style.left = (100 * cell.col / grid[1]) + "%";
        marker.style.top = (100 * cell.row / grid[0]) + "%";
        marker.style.width = (100 / grid[1]) + "%";
        marker.style.height = (100 / grid[0]) + "%";
      });
    });
  };

  Explorer.prototype.scatterPoint = function (v, entry, i, size) {
    var position = [0, 1].map(function (ch) {
      var span = ch < v.r ? entry.rgb_high[ch] - entry.rgb_low[ch] : 0;
      var t = span > 0 ? (v.z[i * v.r + ch] - entry.rgb_low[ch]) / span : 0.5;
      return Math.min(Math.max(t, 0), 1);
    });
    return [4 + position[0] * (size - 8), size - 4 - position[1] * (size - 8)];
  };

  Explorer.prototype.hoverScatter = function (model, event, pin) {
    var d = this.data[model], panel = this.panelOf[model], grid = this.byName[model].grid;
    if (!d || this.mode !== "pca") return;
    var box = panel.scatter.getBoundingClientRect(), size = panel.scatter.width;
    var x = (event.clientX - box.left) * size / box.width, y = (event.clientY - box.top) * size / box.height;
    var n = d.values.z.length / d.values.r, best = 0, bestD = Infinity;
    for (var i = 0; i < n; i++) {
      var p = this.scatterPoint(d.values, d.entry, i, size), dist = (p[0] - x) * (p[0] - x) + (p[1] - y) * (p[1] - y);
      if (dist < bestD) { bestD = dist; best = i; }
    }
    var cells = grid[0] * grid[1], rest = best % cells;
    this.show({image: Math.floor(best / cells), y: (Math.floor(rest / grid[1]) + 0.5) / grid[0],
               x: (rest % grid[1] + 0.5) / grid[1]}, !!pin, event.timeStamp);
  };

  Explorer.prototype.drawScatter = function (model, colours) {
    var d = this.data[model], panel = this.panelOf[model], size = panel.scatter.width;
    var context = panel.scatter.getContext("2d"), n = d.values.z.length / d.values.r;
    context.clearRect(0, 0, size, size);
    for (var i = 0; i < n; i++) {
      var p = this.scatterPoint(d.values, d.entry, i, size);
      context.fillStyle = "rgb(" + colours[4 * i] + "," + colours[4 * i + 1] + "," + colours[4 * i + 2] + ")";
      context.fillRect(p[0] - 1.5, p[1] - 1.5, 3, 3);
    }
    var q = this.scatterPoint(d.values, d.entry, this.cellOf(model, this.query).index, size);
    context.lineWidth = 2;
    context.strokeStyle = "#fff";
    context.strokeRect(q[0] - 5, q[1] - 5, 10, 10);
    context.strokeStyle = "#000";
    context.strokeRect(q[0] - 7, q[1] - 7, 14, 14);
  };

  Explorer.prototype.drawPanel = function (model) {
    var d = this.data[model], panel = this.panelOf[model], info = this.byName[model];
    if (!d || d.entry.layer !== this.entryFor(model).layer) return;
    var v = d.values, entry = d.entry, cells = info.grid[0] * info.grid[1], n = cells * this.n;
    var colours = new Uint8ClampedArray(n * 4), lut, lo, hi, i, c;
    var index = this.index;
    if (this.mode === "similarity") {
      var sim = this.similarity(model).values;
      lo = Infinity; hi = -Infinity;
      for (i = 0; i < n; i++) { if (sim[i] < lo) lo = sim[i]; if (sim[i] > hi) hi = sim[i]; }
      lut = index.colormaps.similarity;
      for (i = 0; i < n; i++) {
        c = hi > lo ? Math.round(255 * (sim[i] - lo) / (hi - lo)) : 255;
        colours.set([lut[3 * c], lut[3 * c + 1], lut[3 * c + 2], 255], 4 * i);
      }
      panel.caption.textContent = "cosine " + lo.toFixed(2) + " (dark) to " + hi.toFixed(2) + " (yellow) · mean |error| of the reduction " + entry.error.mean.toFixed(3);
    } else if (this.mode === "pca") {
      for (i = 0; i < n; i++) {
        for (var ch = 0; ch < 3; ch++) {
          var span = ch < v.r ? entry.rgb_high[ch] - entry.rgb_low[ch] : 0;
          colours[4 * i + ch] = span > 0 ? 255 * (v.z[i * v.r + ch] - entry.rgb_low[ch]) / span : 0;
        }
        colours[4 * i + 3] = 255;
      }
      panel.caption.textContent = "first three principal components as RGB (" + (100 * entry.explained).toFixed(0) + " % of the variance in " + entry.components + " components)";
    } else if (this.mode === "kmeans") {
      var labels = v.kmeans[this.k] || (v.kmeans[this.k] = kmeans(v.z, n, v.r, this.k));
      for (i = 0; i < n; i++) {
        var colour = index.palette[labels[i] % index.palette.length];
        colours.set([colour[0], colour[1], colour[2], 255], 4 * i);
      }
      panel.caption.textContent = "k-means, k = " + this.k + ", on the " + entry.components + " PCA coordinates of these images";
    } else {
      if (!v.norms) {
        panel.caption.textContent = "no pre-norm view of this layer is published";
      } else {
        lut = index.colormaps.norms;
        for (i = 0; i < n; i++) {
          c = Math.round(255 * v.norms[i] / entry.norm_top);
          colours.set([lut[3 * c], lut[3 * c + 1], lut[3 * c + 2], 255], 4 * i);
        }
        panel.caption.textContent = "L2 norm of the pre-norm tokens, 0 to " + entry.norm_top.toFixed(1);
      }
    }
    panel.scatter.hidden = this.mode !== "pca";
    if (this.mode === "pca") this.drawScatter(model, colours);
    panel.canvases.forEach(function (canvas, image) {
      var context = canvas.getContext("2d");
      context.putImageData(new ImageData(colours.subarray(image * cells * 4, (image + 1) * cells * 4), info.grid[1], info.grid[0]), 0, 0);
    });
  };

  // What the page shows, for tests and benchmarks: per model the query patch, the layer and its
  // config, and the cosine of every gallery patch with the query (image-major, row-major).
  Explorer.prototype.similarities = function () {
    var self = this, result = {};
    this.selected.forEach(function (model) {
      var s = self.similarity(model);
      if (!s) return;
      var entry = self.data[model].entry;
      result[model] = {image: s.cell.image, row: s.cell.row, col: s.cell.col, layer: entry.layer, config: entry.config,
                       values: Array.from(s.values)};
    });
    return result;
  };

  function start() {
    document.querySelectorAll(".pa-explorer:not([data-started])").forEach(function (root) {
      root.setAttribute("data-started", "");
      var url = new URL(root.getAttribute("data-index"), document.baseURI).href;
      fetchJson(url).then(function (index) {
        var explorer = new Explorer(root, index, url);
        instances.push(explorer);
        root.patchatlasExplorer = explorer;
      }).catch(function (err) {
        root.textContent = "The explorer could not load its data (" + err.message + ").";
        throw err;
      });
    });
    // Instant navigation replaces the page: forget explorers that are no longer in it.
    for (var i = instances.length - 1; i >= 0; i--) if (!document.contains(instances[i].root)) instances.splice(i, 1);
  }

  window.patchatlasExplorer = {
    instances: instances,
    first: function () { return instances[0] || null; },
    similarities: function () { return instances[0] ? instances[0].similarities() : null; },
    ready: function () { return instances[0] && instances[0].ready ? instances[0].ready : Promise.reject(new Error("no explorer yet")); },
  };

  if (typeof document$ !== "undefined") document$.subscribe(start);
  else document.addEventListener("DOMContentLoaded", start);
})();
