// Every data table sorts by clicking its header (tablesort 5.6.0, vendored under vendor/).
// Material's instant navigation swaps pages without a reload, so hook its document$ stream.
// Reference rows (and their divider) carry data-sort-method, which tablesort leaves in place:
// they stay below the models whatever column is sorted, so a control is never ranked.
document$.subscribe(function () {
  var tables = document.querySelectorAll("article table:not([class])");
  tables.forEach(function (table) {
    ["reference-row", "reference-divider"].forEach(function (name) {
      table.querySelectorAll("span." + name).forEach(function (span) {
        var row = span.closest("tr");
        row.classList.add(name);
        row.setAttribute("data-sort-method", "none");
      });
    });
    new Tablesort(table);
  });
});
