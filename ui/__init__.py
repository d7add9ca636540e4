"""The built-in dashboard: server-rendered pages at ``/ui`` with a little JavaScript of our own;
charts by plotly.js, served from the installed ``plotly`` package (never a CDN, never a copy)."""
