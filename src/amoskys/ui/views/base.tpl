<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
% if get('refresh_s'):
<meta http-equiv="refresh" content="{{refresh_s}}">
% end
<title>{{title}} · AMOSKYS</title>
<link rel="stylesheet" href="/static/style.css">
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
% if get('script'):
<script src="/static/{{script}}" defer></script>
% end
</head>
<body>
<header>
<a class="brand" href="/">AMOSKYS</a>
<nav>
% for href, label in nav:
<a href="{{href}}"{{!' class="active"' if label == title else ''}}>{{label}}</a>
% end
</nav>
</header>
<main>
{{!base}}
</main>
<footer>amoskys {{ui_version}} · read from the hub over mTLS · {{model.fmt_time(now_ns)}}</footer>
</body>
</html>
