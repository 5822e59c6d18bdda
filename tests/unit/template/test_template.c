/* Unit tests of the chat-template interpreter: every shared model template x every test
 * conversation renders byte-identical to jinja2 (or fails where jinja2 raised), plus small
 * templates for whitespace control, loops, filters, undefined, errors and limits.
 *
 * How the reference data was produced: tests/data/chat/expected/ was generated once by
 * scripts/gen-template-refs.py with Debian's python3-jinja2 3.1.6, configured as Hugging Face
 * transformers' chat_template_utils.py does (ImmutableSandboxedEnvironment, trim_blocks and
 * lstrip_blocks on, the loopcontrols extension, tojson = json.dumps(ensure_ascii=False),
 * raise_exception, strftime_now pinned to tests/data/chat/templates.json "now" in UTC). The
 * templates are read from the shared folder (every .jinja in models/templates/ and the Qwen3
 * tokenizer_config.json); the conversations are the .json files in tests/data/chat/. A T__C.txt
 * file holds the exact render; a T__C.err file says jinja2 raised (type, then message). */
#include <dirent.h>
#include <stdbool.h>
#include <string.h>

#include <jansson.h>

#include "testutil.h"
#include "xllm/chat.h"

static char g_data[4096];

static const char *data_dir(void) {
    if (!g_data[0]) {
        snprintf(g_data, sizeof(g_data), "%s", __FILE__);
        char *p = strstr(g_data, "/tests/unit/template/");
        if (p) *p = 0;
        size_t n = strlen(g_data);
        snprintf(g_data + n, sizeof(g_data) - n, "/tests/data/chat");
    }
    return g_data;
}

/* ------------------------------------------------------------------------------------------ */
/* Reference renders                                                                           */
/* ------------------------------------------------------------------------------------------ */

static char *template_source(const char *rel) {
    size_t n;
    char *src = xllm_test_read_file(xllm_test_shared(rel), &n);
    if (!src) return NULL;
    size_t k = strlen(rel);
    if (k > 5 && !strcmp(rel + k - 5, ".json")) {
        json_error_t je;
        json_t *cfg = json_loads(src, 0, &je);
        free(src);
        if (!cfg) return NULL;
        json_t *ct = json_object_get(cfg, "chat_template");
        src = json_is_string(ct) ? strdup(json_string_value(ct)) : NULL;
        json_decref(cfg);
    }
    return src;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Conversation names (file names without .json), sorted. */
static int list_conversations(char ***out) {
    DIR *d = opendir(data_dir());
    assert_non_null(d);
    int n = 0, cap = 64;
    char **names = malloc(sizeof(char *) * (size_t)cap);
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t k = strlen(e->d_name);
        if (k < 6 || strcmp(e->d_name + k - 5, ".json") || !strcmp(e->d_name, "templates.json"))
            continue;
        if (n == cap) names = realloc(names, sizeof(char *) * (size_t)(cap *= 2));
        names[n] = strndup(e->d_name, k - 5);
        n++;
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof(char *), cmp_names);
    *out = names;
    return n;
}

static void test_references(void **state) {
    (void)state;
    char path[8192];
    snprintf(path, sizeof(path), "%s/templates.json", data_dir());
    json_error_t je;
    json_t *man = json_load_file(path, 0, &je);
    assert_non_null(man);
    json_t *tmpls = json_object_get(man, "templates");
    char **convs;
    int nconv = list_conversations(&convs);
    assert_true(nconv >= 10);
    xllm_chat_params params = xllm_chat_default_params();
    params.now = json_integer_value(json_object_get(man, "now"));
    int pass = 0, fail = 0, renders = 0, raises = 0;
    size_t ti;
    json_t *tj;
    json_array_foreach(tmpls, ti, tj) {
        const char *name = json_string_value(json_object_get(tj, "name"));
        const char *rel = json_string_value(json_object_get(tj, "path"));
        json_t *bj = json_object_get(tj, "bos_token"), *ej = json_object_get(tj, "eos_token");
        const char *bos = json_is_string(bj) ? json_string_value(bj) : NULL;
        const char *eos = json_is_string(ej) ? json_string_value(ej) : NULL;
        char *src = template_source(rel);
        if (!src) {
            print_message("cannot read template %s\n", rel);
            fail++;
            continue;
        }
        char err[1024] = "";
        xllm_chat_template *t = NULL;
        if (xllm_chat_template_new(src, strlen(src), &params, &t, err, sizeof(err)) != XLLM_OK) {
            print_message("%s: parse error: %s\n", name, err);
            fail += nconv;
            free(src);
            continue;
        }
        for (int c = 0; c < nconv; c++) {
            snprintf(path, sizeof(path), "%s/%s.json", data_dir(), convs[c]);
            size_t req_n;
            char *req = xllm_test_read_file(path, &req_n);
            assert_non_null(req);
            snprintf(path, sizeof(path), "%s/expected/%s__%s.txt", data_dir(), name, convs[c]);
            size_t want_n = 0;
            char *want = xllm_test_read_file(path, &want_n);
            char *errtxt = NULL;
            if (!want) {
                snprintf(path, sizeof(path), "%s/expected/%s__%s.err", data_dir(), name, convs[c]);
                errtxt = xllm_test_read_file(path, NULL);
                if (!errtxt) {
                    print_message("%s x %s: no expected file\n", name, convs[c]);
                    fail++;
                    free(req);
                    continue;
                }
            }
            char *out = NULL;
            size_t out_n = 0;
            err[0] = 0;
            xllm_status st =
                xllm_chat_template_render(t, req, req_n, bos, eos, &out, &out_n, err, sizeof(err));
            bool ok;
            if (want) {
                renders++;
                ok = st == XLLM_OK && out_n == want_n && !memcmp(out, want, want_n);
                if (!ok) {
                    if (st != XLLM_OK) {
                        print_message("%s x %s: failed: %s\n", name, convs[c], err);
                    } else {
                        size_t i = 0;
                        while (i < out_n && i < want_n && out[i] == want[i]) i++;
                        print_message("%s x %s: differs at byte %zu (got %zu, want %zu)\n"
                                      "  got:  ...%.60s\n  want: ...%.60s\n",
                                      name, convs[c], i, out_n, want_n, out + i, want + i);
                    }
                }
            } else {
                raises++;
                ok = st != XLLM_OK && out == NULL && err[0];
                /* raise_exception's message must come through */
                if (ok && !strncmp(errtxt, "TemplateError\n", 14)) {
                    char *msg = errtxt + 14;
                    char *nl = strchr(msg, '\n');
                    if (nl) *nl = 0;
                    ok = strstr(err, msg) != NULL;
                }
                if (!ok)
                    print_message("%s x %s: jinja2 raised (%s) but got status %d, err '%s'\n", name,
                                  convs[c], errtxt, st, err);
            }
            ok ? pass++ : fail++;
            free(out);
            free(want);
            free(errtxt);
            free(req);
        }
        xllm_chat_template_free(t);
        free(src);
    }
    print_message("chat templates: %d pairs pass (%d renders, %d raises), %d fail\n", pass, renders,
                  raises, fail);
    for (int c = 0; c < nconv; c++) free(convs[c]);
    free(convs);
    json_decref(man);
    assert_int_equal(fail, 0);
    assert_true(pass > 300);
}

/* ------------------------------------------------------------------------------------------ */
/* Small templates                                                                             */
/* ------------------------------------------------------------------------------------------ */

typedef struct tcase {
    const char *tmpl;
    const char *vars; /* JSON object */
    const char *want; /* NULL: must fail */
} tcase;

/* Each expected value was checked against jinja2 3.1.6 in transformers' configuration. */
static const tcase CASES[] = {
    /* whitespace control, trim_blocks, lstrip_blocks */
    {"a\n  {% if true %}\n  x\n  {% endif %}\n  {{ 'y' }}\n{# c #}\nz\n", "{}", "a\n  x\n  y\nz"},
    {"  {%- if true %} a {% endif -%}  \n  b", "{}", " a b"},
    {"x  {% if true %}y{% endif %}", "{}", "x  y"},
    {"x\n  {# c #}  y\n  {%+ if true %}z{% endif %}", "{}", "x\n  y\n  z"},
    {"{{ 'a' }}\n{% if true %}\nb{% endif %}", "{}", "a\nb"},
    {"{% raw %}  {{ x }}\n{% endraw %}\nq", "{}", "  {{ x }}\nq"},
    {"a\r\nb\rc\n\n", "{}", "a\nb\nc\n"},
    {"{{- ' x ' -}}\n\n {{ 'y' }}", "{}", " x y"},
    /* scoping */
    {"{% set x = 1 %}{% for i in [1,2] %}{{ x }}{% set x = 2 %}{% endfor %}{{x}}", "{}", "111"},
    {"{% set x = 1 %}{% for i in [1] %}{{ x }}{% set x = 2 %}{{ x }}{% endfor %}", "{}", "12"},
    {"{% for i in [1,2] %}{% if i == 2 %}{{ y }}{% endif %}{% set y = i %}{% endfor %}{{y}}", "{}",
     ""},
    {"{% set x = 1 %}{% macro m() %}{{ x }}{% endmacro %}{% set x = 2 %}{{ m() }}", "{}", "2"},
    {"{% set ns = namespace(n=0) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% endfor %}"
     "{{ ns.n }}",
     "{}", "6"},
    /* loops */
    {"{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.first }}"
     "{{ loop.last }}{{ loop.length }}|{% endfor %}",
     "{\"xs\": [\"a\", \"b\"]}", "102TrueFalse2|211FalseTrue2|"},
    {"{% for x in xs if x > 1 %}{{ x }}{{ loop.length }}{% else %}none{% endfor %}",
     "{\"xs\": [1, 2, 3]}", "2232"},
    {"{% for x in [] %}a{% else %}empty{% endfor %}", "{}", "empty"},
    {"{% for x in [1,2,3,4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}"
     "{% break %}{% endif %}{{ x }}{% endfor %}",
     "{}", "13"},
    {"{% for k, v in d|items %}{{ k }}={{ v }};{% endfor %}", "{\"d\": {\"b\": 1, \"a\": 2}}",
     "b=1;a=2;"},
    {"{% for x in xs %}{{ loop.previtem }}-{{ loop.nextitem }} {% endfor %}", "{\"xs\": [1,2,3]}",
     "-2 1-3 2- "},
    {"{% for x in 'ab' %}{{ loop.cycle('o', 'e') }}{{ x }}{% endfor %}", "{}", "oaeb"},
    {"{% for x in d %}{{ x }}{% endfor %}", "{\"d\": {\"k1\": 1, \"k2\": 2}}", "k1k2"},
    /* expressions and Python semantics */
    {"{{ 1e16 }} {{ 1.5e-5 }} {{ 7/2 }} {{ 4/2 }} {{ -7//2 }} {{ -7 % 3 }} {{ 2**10 }} "
     "{{ 2**-1 }}",
     "{}", "1e+16 1.5e-05 3.5 2.0 -4 2 1024 0.5"},
    {"{{ [1, 'a', none, true, 1.5, {'a': [1]}, ('x', 2)] }}", "{}",
     "[1, 'a', None, True, 1.5, {'a': [1]}, ('x', 2)]"},
    {"{{ 1 == 1.0 }} {{ true == 1 }} {{ (1,2) == [1,2] }} {{ 1 < 2 < 3 }} {{ 'b' > 'a' }}", "{}",
     "True True False True True"},
    {"{{ 'abc'[1:] }}{{ 'abc'[::-1] }}{{ [1,2,3][-1] }}{{ 'héllo'[1] }}{{ [1,2,3,4][1:3] }}", "{}",
     "bccba3é[2, 3]"},
    {"{{ 'a\\u00e9\\x41\\d\\n' }}", "{}", "aéA\\d\n"},
    {"{{ 'x' ~ 1 ~ none }} {{ 'ab' * 2 }} {{ [0] * 2 }}", "{}", "x1None abab [0, 0]"},
    {"{{ 'a' if x else 'b' }}{{ 'c' if not x }}", "{\"x\": false}", "bc"},
    {"{{ x or 'd' }} {{ x and 'd' }} {{ 0 or [] }}", "{\"x\": \"\"}", "d  []"},
    {"{{ 'ell' in 'hello' }} {{ 2 not in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'x' in undef }}", "{}",
     "True False True False"},
    {"{{ '%s-%d' % ('a', 3) }}", "{}", "a-3"},
    /* filters */
    {"{{ [3,1,2]|sort }} {{ ['b','A','a']|unique|list }} {{ 'A'|lower }} {{ 'hi there'|title }}",
     "{}", "[1, 2, 3] ['b', 'A'] a Hi There"},
    {"{{ undef|length }} {{ undef|list }} {{ undef|items|list }} {{ undef|default('d') }}"
     "{{ ''|default('e', true) }}",
     "{}", "0 [] [] de"},
    {"{{ d|tojson }} {{ d|tojson(indent=2) }}",
     "{\"d\": {\"a\": \"é\\\"\\n\", \"b\": [1, 2.5, {}]}}",
     "{\"a\": \"é\\\"\\n\", \"b\": [1, 2.5, {}]} {\n  \"a\": \"é\\\"\\n\",\n  \"b\": [\n    1,\n"
     "    2.5,\n    {}\n  ]\n}"},
    {"{{ d|tojson(separators=(',', ':'), sort_keys=true) }}", "{\"d\": {\"b\": 1, \"a\": [1, 2]}}",
     "{\"a\":[1,2],\"b\":1}"},
    {"{{ xs|map(attribute='n')|join(',') }} {{ xs|selectattr('n', 'equalto', 2)|list|length }} "
     "{{ xs|rejectattr('n', 'odd')|map(attribute='n')|first }}",
     "{\"xs\": [{\"n\": 1}, {\"n\": 2}, {\"n\": 3}, {\"n\": 4}]}", "1,2,3,4 1 2"},
    {"{{ [1, none, 2]|select|list }} {{ ['a','B']|map('upper')|join }} {{ "
     "[1,2,3]|reject('odd')|list }}",
     "{}", "[1, 2] AB [2]"},
    {"{{ '  x  '|trim }}|{{ 'xxaxx'|trim('x') }}|{{ 'a-b'|replace('-', '+') }}|{{ 3|string + 'x' "
     "}}",
     "{}", "x|a|a+b|3x"},
    {"{{ 1.0|int }} {{ '3.7'|int }} {{ 'x'|int }} {{ true|int }} {{ '2'|float }} {{ -3|abs }}",
     "{}", "1 3 0 1 2.0 3"},
    {"{{ 'a\\nb\\n\\nc'|indent(2) }}|{{ 'a\\nb'|indent(2, true) }}", "{}",
     "a\n  b\n\n  c|  a\n  b"},
    {"{{ {'b': 2, 'a': 1}|dictsort }} {{ [1,2,3]|reverse|list }} {{ 'abc'|reverse }} "
     "{{ [1,2,3]|last }} {{ 'abc'|first }} {{ [4,2]|max }} {{ [4,2]|min }} {{ [1,2]|sum }}",
     "{}", "[('a', 1), ('b', 2)] [3, 2, 1] cba 3 a 4 2 3"},
    {"{% filter upper %}ab{% endfilter %}{% set s | trim %}  x  {% endset %}[{{ s }}]", "{}",
     "AB[x]"},
    /* tests */
    {"{{ x is defined }} {{ y is undefined }} {{ none is none }} {{ 'a' is string }} "
     "{{ 1 is number }} {{ 1.5 is integer }} {{ {} is mapping }} {{ [] is sequence }} "
     "{{ 'a' is iterable }} {{ true is boolean }} {{ false is false }} {{ 3 is odd }} "
     "{{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 2 is in [1,2] }} {{ 'a' is eq 'a' }}",
     "{\"x\": 1}",
     "True True True True True False True True True True True True True True True True"},
    /* string and dict methods */
    {"{{ 'a,b'.split(',') }} {{ 'a b  c'.split() }} {{ ' x '.strip() }} {{ 'Hello World'.title() }}"
     " {{ 'ab'.startswith('a') }} {{ 'ab'.endswith(('x', 'b')) }} {{ 'abc'.find('c') }}",
     "{}", "['a', 'b'] ['a', 'b', 'c'] x Hello World True True 2"},
    {"{{ 'a</think>b'.split('</think>')[-1] }} {{ '\\nx\\n'.lstrip('\\n') }}| {{ 'x'.upper() }} "
     "{{ '{} and {name}'.format(1, name='n') }} {{ ','.join(['a', 'b']) }} {{ 'aXa'.count('a') }}",
     "{}", "b x\n| X 1 and n a,b 2"},
    {"{{ d.get('a') }} {{ d.get('z', 'dflt') }} {{ d.keys()|list }} {{ d.values()|list }} "
     "{{ d.items()|list }} {{ d.a }} {{ d['b'] }} {{ d.zz is defined }}",
     "{\"d\": {\"a\": 1, \"b\": 2}}", "1 dflt ['a', 'b'] [1, 2] [('a', 1), ('b', 2)] 1 2 False"},
    /* macros and call blocks */
    {"{% macro m(a, b='x') %}{{a}}{{b}}{{ caller() if caller is defined else '' }}{% endmacro %}"
     "{{ m(1) }}{{ m(1, b=2) }}{% call m(5) %}C{% endcall %}",
     "{}", "1x125xC"},
    {"{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(3) }}", "{}",
     "321"},
    {"{{ raise_exception is defined }} {{ range(3)|list }} {{ range(1, 7, 2)|list }} "
     "{{ dict(a=1) }} {{ strftime_now('%Y') }}",
     "{}", "True [0, 1, 2] [1, 3, 5] {'a': 1} 2024"},
    {"{% with a = 1 %}{{ a }}{% endwith %}{% generation %}G{% endgeneration %}", "{}", "1G"},
    /* errors */
    {"{{ foo.bar }}", "{}", NULL},
    {"{{ 'a' + undefinedvar }}", "{}", NULL},
    {"{% for a in x %}{% endfor %}", "{\"x\": null}", NULL},
    {"{{ range(1000000)|length }}", "{}", NULL},
    {"{% set l = [1] %}{{ l.append(2) }}", "{}", NULL},
    {"{{ raise_exception('boom') }}", "{}", NULL},
    {"{{ 1 / 0 }}", "{}", NULL},
    {"{% if %}", "{}", NULL},
    {"{% for x in y %}", "{}", NULL},
    {"{{ x | nosuchfilter }}", "{}", NULL},
    {"{{ 'unterminated }}", "{}", NULL},
    {"{% endif %}", "{}", NULL},
    {"{{ (1 }}", "{}", NULL},
    {"{# never closed", "{}", NULL},
    {"{{ undef[0] }}", "{}", NULL},
    {"{{ [1] < 'a' }}", "{}", NULL},
};

static void test_small(void **state) {
    (void)state;
    xllm_chat_params params = xllm_chat_default_params();
    params.now = 1721995200;
    int bad = 0;
    for (size_t i = 0; i < sizeof(CASES) / sizeof(CASES[0]); i++) {
        const tcase *c = &CASES[i];
        char err[512] = "";
        xllm_chat_template *t = NULL;
        xllm_status st =
            xllm_chat_template_new(c->tmpl, strlen(c->tmpl), &params, &t, err, sizeof(err));
        char *out = NULL;
        if (st == XLLM_OK)
            st = xllm_chat_template_render_vars(t, c->vars, strlen(c->vars), &out, NULL, err,
                                                sizeof(err));
        if (c->want) {
            if (st != XLLM_OK || strcmp(out, c->want)) {
                print_message("case %zu: %s\n  got:  '%s'\n  want: '%s'\n  err: %s\n", i, c->tmpl,
                              out ? out : "(fail)", c->want, err);
                bad++;
            }
        } else if (st == XLLM_OK || !err[0] || strncmp(err, "line ", 5)) {
            print_message("case %zu: %s should fail with a line number (got '%s', err '%s')\n", i,
                          c->tmpl, out ? out : "", err);
            bad++;
        }
        free(out);
        xllm_chat_template_free(t);
    }
    assert_int_equal(bad, 0);
}

static void test_error_lines(void **state) {
    (void)state;
    const char *src = "line one\n{% if true %}\n{{ x.y }}\n{% endif %}";
    char err[256] = "";
    xllm_chat_template *t = NULL;
    assert_int_equal(xllm_chat_template_new(src, strlen(src), NULL, &t, err, sizeof(err)), XLLM_OK);
    char *out = NULL;
    assert_int_not_equal(xllm_chat_template_render_vars(t, "{}", 2, &out, NULL, err, sizeof(err)),
                         XLLM_OK);
    assert_null(out);
    assert_string_equal(err, "line 3: 'x' is undefined");
    xllm_chat_template_free(t);

    const char *bad = "a\n\n{% for x in %}";
    assert_int_not_equal(xllm_chat_template_new(bad, strlen(bad), NULL, &t, err, sizeof(err)),
                         XLLM_OK);
    assert_null(t);
    assert_true(!strncmp(err, "line 3:", 7));

    const char *req = "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}";
    const char *alt = "{% if messages|length < 2 %}{{ raise_exception('need two: ' ~ "
                      "messages|length) }}{% endif %}";
    assert_int_equal(xllm_chat_template_new(alt, strlen(alt), NULL, &t, err, sizeof(err)), XLLM_OK);
    assert_int_equal(
        xllm_chat_template_render(t, req, strlen(req), NULL, NULL, &out, NULL, err, sizeof(err)),
        XLLM_ERR_FORMAT);
    assert_string_equal(err, "line 1: need two: 1");
    /* bad requests */
    assert_int_equal(xllm_chat_template_render(t, "{", 1, NULL, NULL, &out, NULL, err, sizeof(err)),
                     XLLM_ERR_INVALID_ARG);
    assert_int_equal(
        xllm_chat_template_render(t, "{}", 2, NULL, NULL, &out, NULL, err, sizeof(err)),
        XLLM_ERR_INVALID_ARG);
    xllm_chat_template_free(t);
}

static void expect_limit(const char *src, const xllm_chat_params *p) {
    char err[256] = "";
    xllm_chat_template *t = NULL;
    char *out = NULL;
    xllm_status st = xllm_chat_template_new(src, strlen(src), p, &t, err, sizeof(err));
    if (st == XLLM_OK)
        st = xllm_chat_template_render_vars(t, "{}", 2, &out, NULL, err, sizeof(err));
    if (st == XLLM_OK) print_message("no limit hit for %s\n", src);
    assert_int_not_equal(st, XLLM_OK);
    assert_null(out);
    xllm_chat_template_free(t);
}

static void test_limits(void **state) {
    (void)state;
    xllm_chat_params p = xllm_chat_default_params();
    p.max_steps = 200000;
    p.max_output = 1 << 20;
    p.max_memory = 32 << 20;
    /* steps */
    expect_limit("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                 &p);
    /* output */
    expect_limit("{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}", &p);
    /* memory */
    expect_limit("{{ 'x' * 100000000 }}", &p);
    expect_limit("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + "
                 "ns.s %}{% endfor %}{{ ns.s|length }}",
                 &p);
    /* recursion */
    expect_limit("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", &p);
    char deep[4096];
    size_t k = 0;
    k += (size_t)snprintf(deep + k, sizeof(deep) - k, "{{ ");
    for (int i = 0; i < 1000; i++) deep[k++] = '(';
    deep[k++] = '1';
    for (int i = 0; i < 1000; i++) deep[k++] = ')';
    snprintf(deep + k, sizeof(deep) - k, " }}");
    expect_limit(deep, &p);
    /* nesting built at run time (would overflow the stack when compared or printed) */
    expect_limit("{% set ns = namespace(x=[]) %}{% for i in range(100000) %}"
                 "{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x == ns.x }}",
                 &p);
    /* sorting or comparing big values costs steps */
    expect_limit("{% set l = range(50000)|list %}{% for i in range(100) %}{{ (l|sort)[0] }}"
                 "{% endfor %}",
                 &p);

    /* a large request object stays fast (hash index) */
    size_t cap = 64 << 20, n = 0;
    char *json = malloc(cap);
    n += (size_t)snprintf(json + n, cap - n, "{\"d\": {");
    for (int i = 0; i < 100000; i++)
        n += (size_t)snprintf(json + n, cap - n, "%s\"k%d\": \"v%d\"", i ? ", " : "", i, i);
    snprintf(json + n, cap - n, "}}");
    const char *src = "{{ d['k99999'] }} {{ d.k5 }} {{ d|length }} {{ 'k77' in d }}";
    xllm_chat_template *t = NULL;
    char err[256];
    assert_int_equal(xllm_chat_template_new(src, strlen(src), NULL, &t, err, sizeof(err)), XLLM_OK);
    char *out = NULL;
    assert_int_equal(
        xllm_chat_template_render_vars(t, json, strlen(json), &out, NULL, err, sizeof(err)),
        XLLM_OK);
    assert_string_equal(out, "v99999 v5 100000 True");
    free(out);
    free(json);
    xllm_chat_template_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_small),
        cmocka_unit_test(test_error_lines),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_references),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
