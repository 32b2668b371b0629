"""Scores of the three benchmark kinds as VLMEvalKit computes them with its exact-matching judge (no judge model):
vlmeval/dataset/image_mcq.py, image_yorn.py, image_vqa.py and their utils (multiple_choice.py, yorn.py,
vqa_eval.py, and matching_util.py's can_infer), written again here from their documented behaviour.

Multiple choice. A row is right when the letter read from the answer is the answer column's. Two readings are kept:
ours (extras.mmbench.extract_choice, the headline) and VLMEvalKit's (`vlmevalkit_choice`), which misses answers
such as "The answer is (B) ..." when the letter is not among the last four words. MMBench, CCBench (and any other
multiple-choice TSV, scored as MMBench) use CircularEval: a question counts as right only if it and every circular
copy (index + k * 1e6) are. Reported: Overall, then one accuracy per l2-category and per category (MMBench's six
l2-categories abbreviated), per split when the TSV has several (MMMU_DEV_VAL: dev, validation); fractions in [0, 1].
MMMU's open questions become two-option ones before scoring, as VLMEvalKit does: A is the reference answer, B "Other
Answers", and A is the right letter (also for any answer that is not a single capital letter).

Yes / no. "Yes" when the lowercased answer, VLMEvalKit's punctuation stripped, holds the word yes and not the word
no; "No" the other way round; otherwise "Unknown" (always wrong). Percentages.
  POPE: accuracy, precision, recall and F1 (yes is the positive class), overall and per split (the category column,
        a question listed under several splits counts in each, overall too).
  MME: per subtask, accuracy + accuracy+ (both questions about one picture right), x100 each, so at most 200; the
       perception total sums the ten perception subtasks, the cognition total (VLMEvalKit: "reasoning") the four
       cognition subtasks. Pictures are told apart by image_path (else the row that holds the picture).
  HallusionBench: aAcc (per question), fAcc (every question about one figure right), qAcc (one question right on
       every figure it is asked about); overall, per category and per l2-category. The set, figure and question
       ids are the 4th, 5th and 6th "_"-separated parts of the index.
  Any other yes/no TSV: accuracy, overall and per category / l2-category.

Open VQA. Answers are normalised as VLMEvalKit's (the VQA challenge's): punctuation, number words ("seven" -> 7),
articles and contractions. TextVQA (and any other VQA TSV): VQA accuracy, min(1, matches / 3) over each set of
nine of the ten references, averaged. GQA: exact match of the normalised answer (ours, the headline) and
VLMEvalKit's exact match after lowercasing and trimming only ("Yes." is wrong there). Percentages, overall and per
split (else per category).
"""

import re
import string
from collections import defaultdict

from extras import mmbench as mm
from extras.benchmarks import as_list
from extras.mmbench import CIRCULAR, Scores, extract_choice

# ----------------------------------------------------------------------------------------------------------------
# VLMEvalKit's answer readings

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
_SPLIT_MARKS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", re.IGNORECASE)


def vlmevalkit_choice(text, options):
    """The letter VLMEvalKit's exact matching reads from an answer (can_infer): "Z" for a refusal (never right),
    "" for none. 1) The answer split into words at whitespace and .()[],:;!*#{}: if exactly one option letter is
    a word, it is the answer when it first occurs among the last four words; with no letter, a word "Z" is a
    refusal. 2) Else "answer is X" (X in A-D, any case, optionally in **). 3) Else, for an answer at most twice as
    long as all option texts together, the one option whose lowercased text occurs in it."""
    text = str(text)
    if "Failed to obtain answer via API" in text:  # VLMEvalKit's marker of a failed call: straight to rule 3
        letter = ""
    elif any(marker in text for marker in REFUSALS):
        return "Z"
    else:
        letter = _letter(text, options)
    return letter or _option_text(text, options)


def _letter(text, options):
    words = text.translate(_SPLIT_MARKS).split()
    present = [c for c in options if c in words]
    if len(present) == 1 and words.index(present[0]) > len(words) - 5:
        return present[0]
    if not present and "Z" in words:
        return "Z"
    m = _ANSWER_IS.search(text)
    return m.group(1).upper() if m and m.group(1).upper() in options else ""


def _option_text(text, options):
    text = text.lower()
    if len(text) > 2 * sum(len(str(v)) for v in options.values()):
        return ""
    found = [c for c, v in options.items() if str(v).lower() in text]
    return found[0] if len(found) == 1 else ""


_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_THOUSANDS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def strip_punctuation(text):
    """VLMEvalKit's (the VQA challenge's) punctuation rule: each mark is deleted where the text has it next to a
    space or holds a digit-comma-digit, else replaced by a space; then a period not between digits is deleted (the
    first 32 of them: VLMEvalKit passes re.UNICODE, 32, where the count goes)."""
    out = text
    for p in _PUNCTUATION:
        spaced = p + " " in text or " " + p in text or _THOUSANDS.search(text)
        out = out.replace(p, "" if spaced else " ")
    return _PERIOD.sub("", out, count=32)


def yes_no(text):
    """ "Yes", "No" or "Unknown": VLMEvalKit's YOrN_Extraction."""
    words = strip_punctuation(str(text).lower()).split()
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return "Unknown"


NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# The VQA challenge's contraction table: each of these is restored from any spelling that lacks one of its
# apostrophes ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've"); plus one entry of the table
# that goes the other way.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
    must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've shouldn't shouldn't've should've somebody'd've
    somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
    that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
    weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
    why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're
    you've""".split()
CONTRACTIONS = {w[:i] + w[i + 1:]: w for w in _CONTRACTED for i, c in enumerate(w) if c == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"


def normalize_answer(text):
    """An answer as the VQA challenge compares it: one line, punctuation stripped, lowercased, number words as
    digits, articles dropped, contractions restored."""
    text = strip_punctuation(str(text).replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice

MMB_L2 = dict(list(mm.CATEGORY_ABBR.items())[:6])  # VLMEvalKit abbreviates MMBench's six l2-categories only
SPLIT_ORDER = ("test", "validation", "val", "dev")   # the split whose Overall is the headline, first found


def _mean(values):
    return sum(values) / len(values) if values else 0.0


def accuracy_table(rows, hits, scale=1.0):
    """VLMEvalKit's report_acc: {"Overall", l2-categories, categories} of the hits, each group's names sorted;
    one such dict per split ({split: {...}}) when the rows come from several splits."""
    def table(sub):
        out = {"Overall": _mean([hits[id(r)] for r in sub]) * scale}
        for key in ("l2-category", "category"):
            for name in sorted({r[key] for r in sub if r[key]}):
                out[MMB_L2.get(name, name)] = _mean([hits[id(r)] for r in sub if r[key] == name]) * scale
        return out
    splits = sorted({r.get("split", "") for r in rows})
    if len(splits) <= 1:
        return table(rows)
    return {sp: table([r for r in rows if r.get("split", "") == sp]) for sp in splits}


def _headline_split(metrics):
    if "Overall" in metrics:
        return metrics, ""
    split = next((s for s in SPLIT_ORDER if s in metrics), sorted(metrics)[0])
    return metrics[split], split + " "


def score_mcq(bench, records):
    """Fills each record's extracted / hit (ours) and vlmevalkit_extracted / vlmevalkit_hit; returns Scores."""
    circular = bench.rules == "mmbench" and all(isinstance(r["index"], int) for r in records)
    xtuner = mm.score(records, any(r["l2-category"] for r in records)) if circular else None
    for r in records:
        options, truth = r["options"], str(r["answer"]).strip()
        if bench.rules == "mmmu":  # VLMEvalKit's MMMU_preproc: an open question becomes a two-option one
            options = options or {"A": truth, "B": "Other Answers"}
            truth = truth if len(truth) == 1 and truth in string.ascii_uppercase else "A"
        if not circular:
            r["extracted"] = extract_choice(str(r["prediction"] or ""), options)
            r["hit"] = r["extracted"] != "" and r["extracted"] == truth
        r["vlmevalkit_extracted"] = vlmevalkit_choice(r["prediction"], options)
        r["vlmevalkit_hit"] = r["vlmevalkit_extracted"] == truth
    groups = defaultdict(list)
    for r in records:
        groups[r["index"] % CIRCULAR if circular else r["index"]].append(r)
    mains = [r for r in records if not circular or r["index"] < CIRCULAR]
    ours = {id(r): all(c["hit"] for c in groups[r["index"]]) for r in mains}
    theirs = {id(r): all(c["vlmevalkit_hit"] for c in groups[r["index"]]) for r in mains}
    result = {"metrics": accuracy_table(mains, ours), "vlmevalkit": accuracy_table(mains, theirs)}
    table, split = _headline_split(result["metrics"])
    result["headline"] = split + "Overall"
    n_unparsed = sum(r["extracted"] == "" for r in records)
    if xtuner:
        xtuner.result, xtuner.headline = result, f"{table['Overall'] * 100:.1f}"
        return xtuner
    return Scores(result["metrics"], len(mains), len(records), n_unparsed, [], result, f"{table['Overall'] * 100:.1f}")


# ----------------------------------------------------------------------------------------------------------------
# Yes / no

MME_PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters",
                  "scene")
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


def _pope(rows):
    right = [r["hit"] for r in rows]
    tp = sum(r["answer"] == "Yes" and r["extracted"] == "Yes" for r in rows)
    said_yes = sum(r["extracted"] == "Yes" for r in rows)
    is_yes = sum(r["answer"] == "Yes" for r in rows)
    precision, recall = (tp / said_yes if said_yes else 0.0), (tp / is_yes if is_yes else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"F1": f1 * 100, "acc": _mean(right) * 100, "precision": precision * 100, "recall": recall * 100}


def _mme(rows):
    pictures = defaultdict(lambda: defaultdict(list))  # category -> picture -> hits, in TSV order
    for r in rows:
        pictures[r["category"]][r["image_key"]].append(r["hit"])
    scores = {c: 100 * _mean([h for hits in p.values() for h in hits]) + 100 * _mean([all(h) for h in p.values()])
              for c, p in pictures.items()}
    return {"perception": sum(scores.get(c, 0.0) for c in MME_PERCEPTION),
            "cognition": sum(scores.get(c, 0.0) for c in MME_COGNITION), **scores}


def _by_group(rows, measure):
    """{"Overall": measure(rows), then one entry per category and per l2-category (sorted names)}."""
    out = {"Overall": measure(rows)}
    for key in ("category", "l2-category"):
        for name in sorted({r[key] for r in rows if r[key]}):
            out[name] = measure([r for r in rows if r[key] == name])
    return out


def _hallusion(rows):
    def ids(r):
        p = str(r["index"]).split("_")
        return (p[3], p[4], p[5]) if len(p) >= 6 else (str(r["index"]),) * 3  # a malformed index: its own group

    def measure(sub):
        figure, question = defaultdict(list), defaultdict(list)
        for r in sub:
            set_id, figure_id, question_id = ids(r)
            figure[(r["l2-category"], set_id, figure_id)].append(r["hit"])
            question[(r["l2-category"], set_id, question_id)].append(r["hit"])
        return {"aAcc": _mean([r["hit"] for r in sub]) * 100, "fAcc": _mean([all(v) for v in figure.values()]) * 100,
                "qAcc": _mean([all(v) for v in question.values()]) * 100}
    return _by_group(rows, measure)


def score_yorn(bench, records):
    for r in records:
        r["extracted"] = yes_no(r["prediction"])
        r["hit"] = r["extracted"] == r["answer"]
    result = {}
    if bench.rules == "pope":  # a row listed under several splits ("adversarial,random") counts in each
        rows = [{**r, "category": c.strip()} for r in records for c in r["category"].split(",")]
        metrics = {"Overall": _pope(rows)}
        metrics.update({c: _pope([r for r in rows if r["category"] == c])
                        for c in sorted({r["category"] for r in rows} - {""})})
        headline, cell = "Overall F1", f"{metrics['Overall']['F1']:.1f}"
    elif bench.rules == "mme":
        metrics = _mme(records)
        headline, cell = "perception/cognition", f"{metrics['perception']:.1f}/{metrics['cognition']:.1f}"
        result["missing_subtasks"] = [c for c in MME_PERCEPTION + MME_COGNITION if c not in metrics]
    elif bench.rules == "hallusion":
        metrics = _hallusion(records)
        headline, cell = "Overall aAcc", f"{metrics['Overall']['aAcc']:.1f}"
    else:  # VLMEvalKit's default_rating
        metrics = _by_group(records, lambda sub: _mean([r["hit"] for r in sub]) * 100)
        headline, cell = "Overall", f"{metrics['Overall']:.1f}"
    n_unparsed = sum(r["extracted"] == "Unknown" for r in records)
    return Scores(metrics, len(records), len(records), n_unparsed, [],
                  {"metrics": metrics, "headline": headline, **result}, cell)


# ----------------------------------------------------------------------------------------------------------------
# Open VQA


def vqa_accuracy(prediction, references):
    """The VQA challenge's accuracy of one answer: for each reference left out in turn, min(1, the other references
    equal to the answer / 3), averaged; everything normalised first (normalize_answer)."""
    pred, refs = normalize_answer(prediction), [normalize_answer(x) for x in references]
    return _mean([min(1.0, sum(x == pred for j, x in enumerate(refs) if j != i) / 3) for i in range(len(refs))])


def vqa_table(records, key):
    """VLMEvalKit's VQA report: Overall and one figure per split, else Overall and one per category; percentages."""
    out = {"Overall": _mean([r[key] for r in records]) * 100}
    group = "split" if any(r.get("split") for r in records) else "category"
    for name in sorted({r.get(group, "") for r in records} - {""}):
        out[name] = _mean([r[key] for r in records if r.get(group) == name]) * 100
    return out


def score_vqa(bench, records):
    for r in records:
        refs = as_list(str(r["answer"])) or [str(r["answer"])]
        if bench.rules == "gqa":
            pred = str(r["prediction"])
            r["hit"] = float(normalize_answer(pred) in {normalize_answer(x) for x in refs})
            r["vlmevalkit_hit"] = _mean([float(x.strip().lower() == pred.strip().lower()) for x in refs])
        else:
            r["hit"] = vqa_accuracy(r["prediction"], refs)
        r["extracted"] = normalize_answer(r["prediction"])
    result = {"metrics": vqa_table(records, "hit"), "headline": "Overall"}
    if bench.rules == "gqa":
        result["vlmevalkit"] = vqa_table(records, "vlmevalkit_hit")
    n_empty = sum(r["extracted"] == "" for r in records)
    return Scores(result["metrics"], len(records), len(records), n_empty, [], result,
                  f"{result['metrics']['Overall']:.1f}")


# ----------------------------------------------------------------------------------------------------------------
# The three together: scores, the printed report, the summary table


def score(bench, records):
    """Scores of a dev split's records (each gets extracted / hit filled in); Scores.result is <name>_result.json."""
    scores = {"mcq": score_mcq, "yorn": score_yorn, "vqa": score_vqa}[bench.kind](bench, records)
    scale = "points (a subtask at most 200)" if bench.rules == "mme" else "0-1" if bench.kind == "mcq" else "0-100"
    scores.result = {"benchmark": bench.name, "kind": bench.kind, "rules": bench.rules, "scale": scale,
                     **scores.result, "counts": {"questions": scores.n_main, "rows": scores.n_rows,
                                                 "unparsed": scores.n_unparsed}}
    return scores


READING = {"mcq": "a letter was extracted from", "yorn": "a yes or no was read in",
           "vqa": "a non-empty normalised answer came from"}


def describe(bench, scores, title):
    """The printed report of one benchmark: its table(s) and how many answers could be read."""
    metrics, lines = scores.result["metrics"], []
    if scores.orphans:
        lines.append(f"note: {len(scores.orphans)} circular copies have no main question among the predictions "
                     f"and are not scored (e.g. index {scores.orphans[0]})")
    if bench.kind == "mcq":
        table = scores.metrics if bench.rules == "mmbench" and "Average" in scores.metrics else metrics
        if table and isinstance(next(iter(table.values())), dict):  # several splits: one column each
            names = list(dict.fromkeys(name for t in table.values() for name in t))
            table = {name: {sp: t.get(name) for sp, t in table.items()} for name in names}
        lines.append(mm.format_table(table, title))
    elif bench.rules == "mme":
        lines.append(mm.format_table(metrics, title, scale=1, unit="Score", totals=2))
        if scores.result["missing_subtasks"]:
            lines.append(f"note: subtasks missing from the TSV (the totals sum the others): "
                         f"{', '.join(scores.result['missing_subtasks'])}")
    else:
        lines.append(mm.format_table(metrics, title, scale=1))
    counted = f"{scores.n_main} questions" + (f" ({scores.n_rows} rows with circular copies)"
                                             if scores.n_rows != scores.n_main else "")
    lines.append(f"{counted}; {READING[bench.kind]} {scores.n_rows - scores.n_unparsed} of {scores.n_rows} answers "
                 "(exact matching, no judge model)")
    if "vlmevalkit" in scores.result:
        theirs, split = _headline_split(scores.result["vlmevalkit"])
        scale = 100 if bench.kind == "mcq" else 1
        lines.append(f"VLMEvalKit's own {'letter matching' if bench.kind == 'mcq' else 'exact match'} gives "
                     f"{split}Overall {theirs['Overall'] * scale:.1f} (the result file keeps both)")
    return "\n".join(lines)


def summary_table(model, cells):
    """One row, one column per benchmark, like the results tables of the LLaVA model cards.
    cells: {column title: cell text}."""
    head = ["model"] + list(cells)
    row = [model] + list(cells.values())
    widths = [max(len(a), len(b)) for a, b in zip(head, row)]
    fmt = lambda xs: "| " + " | ".join(f"{x:<{w}}" for x, w in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", fmt(row)])
