// Every data table sorts by clicking its header (tablesort 5.6.0, vendored under vendor/).
// Material's instant navigation swaps pages without a reload, so hook its document$ stream.
document$.subscribe(function () {
  var tables = document.querySelectorAll("article table:not([class])");
  tables.forEach(function (table) {
    new Tablesort(table);
  });
});
