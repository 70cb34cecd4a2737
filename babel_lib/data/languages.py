"""Language metadata (name, family, genus, script, FLORES+ config) for the corpus and FLORES+ languages."""

from __future__ import annotations

from dataclasses import dataclass

from babel_lib.errors import BabelError


@dataclass(frozen=True)
class Language:
    """One language: babel code, English name, family and genus, ISO 15924 script, FLORES+ config name."""

    code: str
    name: str
    family: str
    genus: str
    script: str
    flores: str


LANGUAGES: tuple[Language, ...] = (
    Language("en", "English", "Indo-European", "Germanic", "Latn", "eng_Latn"),
    Language("de", "German", "Indo-European", "Germanic", "Latn", "deu_Latn"),
    Language("fr", "French", "Indo-European", "Romance", "Latn", "fra_Latn"),
    Language("es", "Spanish", "Indo-European", "Romance", "Latn", "spa_Latn"),
    Language("ru", "Russian", "Indo-European", "Slavic", "Cyrl", "rus_Cyrl"),
    Language("pl", "Polish", "Indo-European", "Slavic", "Latn", "pol_Latn"),
    Language("el", "Greek", "Indo-European", "Hellenic", "Grek", "ell_Grek"),
    Language("fi", "Finnish", "Uralic", "Finnic", "Latn", "fin_Latn"),
    Language("et", "Estonian", "Uralic", "Finnic", "Latn", "ekk_Latn"),
    Language("hu", "Hungarian", "Uralic", "Ugric", "Latn", "hun_Latn"),
    Language("eu", "Basque", "Basque (isolate)", "Basque", "Latn", "eus_Latn"),
    Language("tr", "Turkish", "Turkic", "Oghuz", "Latn", "tur_Latn"),
    Language("ja", "Japanese", "Japonic", "Japanese", "Jpan", "jpn_Jpan"),
    Language("ko", "Korean", "Koreanic", "Korean", "Hang", "kor_Hang"),
    Language("zh-CN", "Chinese (Simplified)", "Sino-Tibetan", "Sinitic", "Hans", "cmn_Hans"),
    Language("vi", "Vietnamese", "Austroasiatic", "Vietic", "Latn", "vie_Latn"),
    Language("id", "Indonesian", "Austronesian", "Malayo-Polynesian", "Latn", "ind_Latn"),
    # Not in the LibreOffice corpus; for FLORES+ users (the Babel paper's v1 set and gnome-user-docs languages).
    Language("pt", "Portuguese", "Indo-European", "Romance", "Latn", "por_Latn"),
    Language("ar", "Arabic (Modern Standard)", "Afro-Asiatic", "Semitic", "Arab", "arb_Arab"),
    Language("hi", "Hindi", "Indo-European", "Indo-Aryan", "Deva", "hin_Deva"),
    Language("bn", "Bengali", "Indo-European", "Indo-Aryan", "Beng", "ben_Beng"),
    Language("ur", "Urdu", "Indo-European", "Indo-Aryan", "Arab", "urd_Arab"),
    Language("uk", "Ukrainian", "Indo-European", "Slavic", "Cyrl", "ukr_Cyrl"),
    Language("sr", "Serbian", "Indo-European", "Slavic", "Cyrl", "srp_Cyrl"),
    Language("hr", "Croatian", "Indo-European", "Slavic", "Latn", "hrv_Latn"),
    Language("lv", "Latvian", "Indo-European", "Baltic", "Latn", "lvs_Latn"),
    Language("ta", "Tamil", "Dravidian", "South Dravidian", "Taml", "tam_Taml"),
    Language("mr", "Marathi", "Indo-European", "Indo-Aryan", "Deva", "mar_Deva"),
    Language("fa", "Persian", "Indo-European", "Iranian", "Arab", "pes_Arab"),
)

# The 17 languages of the shipped LibreOffice help corpus, in column order.
CORPUS_LANGUAGES: tuple[str, ...] = tuple(lang.code for lang in LANGUAGES[:17])


def language(code: str) -> Language:
    """The metadata of one language; an unknown code raises BabelError naming the known codes."""
    for lang in LANGUAGES:
        if lang.code == code:
            return lang
    known = ", ".join(lang.code for lang in LANGUAGES)
    raise BabelError(f"unknown language code {code!r}; use one of: {known}")
